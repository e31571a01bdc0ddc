"""Fused block quantization: one Pallas (Triton) kernel reads each tile of x once and writes data + scales.

Same numerics and the same bits as lowbit.quantize (OCP MX v1.0 sec. 6.3 FLOOR, NVIDIA RCEIL, NVFP4
two-level scaling with correctly rounded divisions), for nearest and stochastic rounding: SR hashes
each element's flat index in x in-kernel with lowbit.quantize's sr_hash / sr_seeds (no random bits
read from memory). Nearest rounding is integer RNE on the float32 bits, SR is round_to_grid's
floor(t) + [u < t - floor(t)], t = y / ulp; codes are written directly as
((max(E, emin) - emin) << mbits) + |r| | sign, r the rounded y / ulp.

Used automatically: lowbit's GEMMs (dot_general, einsum, ragged_dot) quantize through
lowbit.kernels.dispatch, which runs this kernel on a single GPU ("auto", the default) and falls
back to lowbit.quantize where the kernel cannot take a call; see set_quantize_impl /
$LOWBIT_QUANTIZE_IMPL there. It can also be called directly as quantize_fused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.formats import Format, get_format
from lowbit.quantize import (
    ROUNDINGS,
    SCALE_MODES,
    BlockValues,
    QArray,
    _div_rn,
    _normalize_axes,
    sr_hash,
    sr_seeds,
    uniform_from_bits,
)

DIV_IMPLS = ("auto", "ptx", "int")  # correctly rounded f32 division: PTX div.rn.f32 | int long division
# RNE onto the element grid: integer ops on the float32 bits | the float32 -> FP8 convert (8-bit elements
# only; on an H100 the integer RNE made the FP8 cast ALU-bound, docs/benchmarks.md, eighth session) |
# midpoint compares (E2M1) | one float add of a power of two whose ulp is the grid's (any element format)
ENCODE_IMPLS = ("auto", "integer", "convert", "threshold", "magic")  # threshold: E2M1 only (7 compares)
SCALE_ENCODES = ("auto", "integer", "convert")  # NVFP4's E4M3 block scale: integer RNE | FP8 convert
# E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: the midpoints between codes c and c+1, and whether a tie goes
# up (the upper code is even) -> code = number of midpoints |y| is past (RNE, OCP MX v1.0 sec. 5.3.3).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
                   (5.0, False))
_FP8_BY_MBITS = {3: jnp.float8_e4m3fn, 2: jnp.float8_e5m2}
FP4_LAYOUTS = ("packed", "codes")  # kernel writes two E2M1 codes per byte | one code per byte
# How the kernel stores codes: int32 words of 32 bits of consecutive codes (8 packed FP4 or 4 FP8), so that
# each thread's stores are 4 bytes wide | one byte per store (the FP8 cast kernel's transposed copy gained
# 1.22-1.30x from words, docs/benchmarks.md, tenth session). Same bits either way (little-endian words).
# auto (unless $LOWBIT_QUANTIZE_STORE says "words" or "bytes"): words for FP4, 1.45-1.51x faster than bytes
# on an H200; bytes for FP8, where words were within run-to-run noise (0.57-1.09x; docs/benchmarks.md, twelfth
# session)
STORES = ("auto", "words", "bytes")
STORE_ENV_VAR = "LOWBIT_QUANTIZE_STORE"
# (block_rows, block_cols, num_warps) by element bits when not given: FP4 from the H200's word-store sweep
# (8x512 with 4 warps: 1.09-1.17x the 16x512 / 8 warps of FP8 on NVFP4, equal on MXFP4)
DEFAULT_TILES = {8: (16, 512, 8), 4: (8, 512, 4)}
_FLOAT_INPUTS = (jnp.float32, jnp.bfloat16, jnp.float16)
_SUPPORTED_KINDS = ("mx", "nvfp4")
_SIGN = np.int32(-(2**31))
_ABS = np.int32(0x7FFFFFFF)
_F32_INF_BITS = 0x7F800000
_F32_MIN_NORMAL_BITS = 0x00800000
_E8M0_NAN = 255
_E4M3_NAN = 0x7F  # jnp.nan.astype(float8_e4m3fn), as lowbit.quantize stores for poisoned blocks
_NVFP4_MIN_TENSOR_SCALE = 2.0**-120
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_MAX = 448.0
_E2M1_MAX = 6.0


# ----------------------------------------------------------------------------- static plan
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything the kernel body needs to know at trace time (hashable: a jit static argument)."""

    kind: str  # "mx" | "nvfp4"
    block: int  # elements per block along the last axis
    tile_rows: int  # 1 for 1-D blocks, block for block x block tiles
    emin: int
    emax: int
    mbits: int
    elem_bits: int
    elem_max: float
    scale_mode: str
    rounding: str
    div: str  # "ptx" | "int" (resolved)
    encode: str  # "integer" | "convert" | "threshold" | "magic" (resolved)
    scale_encode: str  # NVFP4 block scale onto E4M3: "integer" | "convert" (resolved); MX: "unused"
    packed: bool  # FP4 written two codes per byte
    words: bool  # stored as int32 words of 32 // code_bits codes
    prescale: float
    values_dtype: str | None = None  # emit data · block scale in this dtype instead of codes and scales

    @property
    def code_bits(self) -> int:
        """Bits per stored code: 4 for packed FP4, else a byte."""
        return 4 if self.packed else 8

    @property
    def pack(self) -> int:
        """Consecutive codes ORed into one stored unit (a byte or an int32 word); 1: one code per byte."""
        return (32 if self.words else 8) // self.code_bits

    @property
    def red_axes(self) -> tuple[int, ...]:
        """Axes of the tile view that one scale covers (axis 1 has size 1 for 1-D blocks: skipped)."""
        rows = (1,) if self.tile_rows > 1 else ()
        return (*rows, 3, 4) if self.pack > 1 else (*rows, 3)


def _view_shape(m: int, n: int, plan: _Plan) -> tuple[int, ...]:
    """x (m, n) seen as (m/R, R, n/B, B), or (..., B/P, P) with P = plan.pack > 1; a free reshape in XLA."""
    r, b = plan.tile_rows, plan.block
    tail = (b // plan.pack, plan.pack) if plan.pack > 1 else (b,)
    return (m // r, r, n // b, *tail)


def _pow2_divisor(n: int, limit: int) -> int:
    """Largest power of two that divides n and is <= limit (>= 1): Triton blocks are powers of two."""
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


# ----------------------------------------------------------------------------- in-kernel bit helpers
def _tiling(view: tuple[int, ...], tile_rows: int, block: int, block_rows: int, block_cols: int):
    """(row groups per tile, blocks per tile, grid, index map(p, rank)) of a view (m/R, R, n/B, ...): a 1-D
    grid (no CUDA launch-dimension limits), row-major over tiles of about block_rows x block_cols of x."""
    rows_per_tile = _pow2_divisor(view[0], max(1, block_rows // tile_rows))
    blocks_per_tile = _pow2_divisor(view[2], max(1, block_cols // block))
    tiles_per_row = view[2] // blocks_per_tile
    grid = ((view[0] // rows_per_tile) * tiles_per_row,)

    def index(p, rank):
        return (p // tiles_per_row, 0, p % tiles_per_row) + (0,) * (rank - 3)

    return rows_per_tile, blocks_per_tile, grid, index


def _pow2(k: jax.Array) -> jax.Array:
    """2^k as float32 from the exponent bits, k int32 in [-126, 127]."""
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _div_rn_int(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b correctly rounded (RNE) for a >= 0 and normal b > 0: lowbit.quantize._div_rn on int32 ops."""
    a_bits = lax.bitcast_convert_type(a, jnp.int32)
    b_bits = lax.bitcast_convert_type(b, jnp.int32)
    a_man = (a_bits & 0x7FFFFF) | 0x800000
    b_man = (b_bits & 0x7FFFFF) | 0x800000
    exp = ((a_bits >> 23) & 0xFF) - ((b_bits >> 23) & 0xFF) + 127
    small = a_man < b_man
    rem = jnp.where(small, a_man << 1, a_man)
    exp = exp - small.astype(jnp.int32)
    quot = jnp.zeros_like(rem)
    for _ in range(24):  # the leading one and 23 mantissa bits
        bit = (rem >= b_man).astype(jnp.int32)
        quot = (quot << 1) | bit
        rem = (rem - bit * b_man) << 1
    guard = rem >= b_man
    sticky = (rem - guard.astype(jnp.int32) * b_man) != 0
    quot = quot + (guard & (sticky | ((quot & 1) == 1))).astype(jnp.int32)
    carry = quot >> 24
    quot = jnp.where(carry == 1, quot >> 1, quot)
    exp = exp + carry
    out = lax.bitcast_convert_type((exp << 23) | (quot & 0x7FFFFF), jnp.float32)
    out = jnp.where(exp >= 255, jnp.float32(np.inf), jnp.where(exp <= 0, jnp.float32(0.0), out))
    return jnp.where(a == 0, jnp.float32(0.0), out)


def _div_rn_ptx(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b by PTX div.rn.f32 (IEEE RNE); Triton's own f32 '/' is div.full.f32, not correctly rounded."""
    from jax.experimental.pallas import triton as pltriton  # GPU-only path

    (q_bits,) = pltriton.elementwise_inline_asm(
        "{ .reg .f32 a, b, q; mov.b32 a, $1; mov.b32 b, $2; div.rn.f32 q, a, b; mov.b32 $0, q; }",
        args=[lax.bitcast_convert_type(a, jnp.int32), lax.bitcast_convert_type(b, jnp.int32)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)],
    )
    return lax.bitcast_convert_type(q_bits, jnp.float32)


def _grid_exponent(y_abs_bits: jax.Array, emin: int) -> tuple[jax.Array, jax.Array]:
    """Biased f32 exponent E of |y| and of its grid binade ue = max(E, emin + 127)."""
    e_biased = y_abs_bits >> 23
    return e_biased, jnp.maximum(e_biased, emin + 127)


def _encode_nearest(y: jax.Array, emin: int, mbits: int, elem_bits: int) -> jax.Array:
    """Element code of RNE(y) on the grid {m * 2^(max(E, emin) - mbits)}, |y| <= max; int32.

    rint(|y| / ulp) = RNE(m24 >> shift) with m24 the 24-bit significand and shift = 23 - mbits +
    ue - E; f32 zeros and subnormals give shift >= 25, hence 0 (they round to 0 on every grid).
    """
    y_bits = lax.bitcast_convert_type(y, jnp.int32)
    y_abs = y_bits & _ABS
    e_biased, ue = _grid_exponent(y_abs, emin)
    shift = jnp.minimum(23 - mbits + ue - e_biased, 25)
    man = (y_abs & 0x7FFFFF) | 0x800000
    lsb = (man >> shift) & 1
    r = (man + ((1 << (shift - 1)) - 1) + lsb) >> shift  # round half to even
    code = ((ue - (emin + 127)) << mbits) + r  # a carry into the next binade lands in the exponent field
    sign = lax.shift_right_logical(y_bits, 31) << (elem_bits - 1)
    return code | sign


def _encode_magic(y: jax.Array, emin: int, mbits: int, elem_bits: int) -> jax.Array:
    """_encode_nearest's code by one float add: M = 2^(ulp exponent + 23) has the grid's ulp as its own,
    so the FPU's RNE add |y| + M leaves k = rint(|y| / ulp) (ties to even) in the low bits of the sum;
    code = ((ue - emin - 127) << mbits) + k, a carry into the next binade included. |y| <= max."""
    y_bits = lax.bitcast_convert_type(y, jnp.int32)
    y_abs = y_bits & _ABS
    ue = jnp.maximum(y_abs >> 23, emin + 127)
    magic_bits = (ue + (23 - mbits)) << 23  # biased exponent of 2^(ue - 127 - mbits + 23)
    total = lax.bitcast_convert_type(y_abs, jnp.float32) + lax.bitcast_convert_type(magic_bits, jnp.float32)
    k = lax.bitcast_convert_type(total, jnp.int32) - magic_bits
    code = ((ue - (emin + 127)) << mbits) + k
    sign = lax.shift_right_logical(y_bits, 31) << (elem_bits - 1)
    return code | sign


def _encode_e2m1_threshold(y: jax.Array) -> jax.Array:
    """E2M1 code of RNE(y), |y| <= 6, by counting the midpoints |y| is past (ties: toward the even code)."""
    a = jnp.abs(y)
    code = jnp.zeros(y.shape, jnp.int32)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code = code + (a >= mid if tie_up else a > mid).astype(jnp.int32)
    sign = lax.shift_right_logical(lax.bitcast_convert_type(y, jnp.int32), 31) << 3
    return code | sign


def _decode(code: jax.Array, emin: int, mbits: int, elem_bits: int) -> jax.Array:
    """float32 value of an int32 element code (sign in bit elem_bits-1, exponent field e, mantissa m):
    (1 + m/2^mbits)·2^(e - 1 + emin) for e > 0, m·2^(emin - mbits) for e = 0 (subnormals)."""
    magnitude = code & ((1 << (elem_bits - 1)) - 1)
    e, m = magnitude >> mbits, magnitude & ((1 << mbits) - 1)
    normal = lax.bitcast_convert_type(((e + (emin - 1 + 127)) << 23) | (m << (23 - mbits)), jnp.float32)
    value = jnp.where(e > 0, normal, m.astype(jnp.float32) * jnp.float32(2.0 ** (emin - mbits)))
    sign = ((code >> (elem_bits - 1)) & 1) << 31
    return lax.bitcast_convert_type(lax.bitcast_convert_type(value, jnp.int32) | sign, jnp.float32)


def _block_values(codes: jax.Array, scale_code: jax.Array, poisoned: jax.Array, plan: _Plan) -> jax.Array:
    """data · scale per block, as lowbit.dequantize computes it with tensor scale 1 and no prescale: MX
    x·2^(s//2)·2^(s - s//2) (lowbit.quantize._mul_pow2), NVFP4 x·(E4M3 scale); NaN for poisoned blocks."""
    values = _decode(codes, plan.emin, plan.mbits, plan.elem_bits)
    if plan.kind == "mx":
        s = scale_code - 127
        half = s >> 1  # floor(s / 2), as lowbit.quantize._mul_pow2's s // 2
        values = values * _pow2(half) * _pow2(s - half)
    else:
        values = values * _decode(scale_code, -6, 3, 8)  # E4M3: emin -6, 3 mantissa bits
    return jnp.where(poisoned, jnp.float32(jnp.nan), values)


def _encode_stochastic(y: jax.Array, u: jax.Array, emin: int, mbits: int, elem_bits: int) -> jax.Array:
    """Element code of floor(t) + [u < t - floor(t)], t = y / ulp (lowbit.quantize.round_to_grid's rule)."""
    y_bits = lax.bitcast_convert_type(y, jnp.int32)
    _, ue = _grid_exponent(y_bits & _ABS, emin)
    t = y * _pow2((127 + mbits) - ue)  # y / ulp, exact: ulp is a normal power of two
    floor_t = jnp.floor(t)
    r = floor_t + (u < t - floor_t).astype(jnp.float32)
    r_bits = lax.bitcast_convert_type(r, jnp.int32)
    r_abs = lax.bitcast_convert_type(r_bits & _ABS, jnp.float32).astype(jnp.int32)
    code = ((ue - (emin + 127)) << mbits) + r_abs
    sign = lax.shift_right_logical(r_bits, 31) << (elem_bits - 1)  # r's sign: floor(-0.3) + 1 = +0
    return code | sign


def _flat_index(shape: tuple[int, ...], origin: tuple[jax.Array, jax.Array], n: int,
                plan: _Plan) -> jax.Array:
    """C-order flat index in x (m, n), mod 2^32, of each element of a tile of the view
    (m/R, R, n/B, B) or (m/R, R, n/B, B/P, P), P = plan.pack: row = (row group)·R + r, col = block·B + c.
    uint32 arithmetic is exact mod 2^32, so this equals lowbit.quantize.flat_index(x.shape)."""
    r, b = plan.tile_rows, plan.block
    row0, blk0 = origin
    ax = [lax.broadcasted_iota(jnp.uint32, shape, d) for d in range(len(shape))]
    row = (row0.astype(jnp.uint32) + ax[0]) * jnp.uint32(r) + ax[1]
    col = (blk0.astype(jnp.uint32) + ax[2]) * jnp.uint32(b)
    col = col + (ax[3] * jnp.uint32(plan.pack) + ax[4] if plan.pack > 1 else ax[3])
    return row * jnp.uint32(n) + col


# ----------------------------------------------------------------------------- kernel
def _block_scales(amax_bits: jax.Array, params: tuple[jax.Array, jax.Array] | None, plan: _Plan):
    """Per block: (scale code int32, element multiplier f32) from the flushed finite amax bits."""
    if plan.kind == "mx":
        if plan.scale_mode == "floor":  # OCP MX v1.0 sec. 6.3: floor(log2 amax) - emax
            s = jnp.clip((amax_bits >> 23) - 127 - plan.emax, -127, 127)
        else:  # rceil, as lowbit.quantize._mx_scale_exponent (tiny amax scaled by 2^64 first)
            amax = lax.bitcast_convert_type(amax_bits, jnp.float32)
            tiny = amax < jnp.float32(2.0**-64)
            amax = jnp.where(tiny, amax * jnp.float32(2.0**64), amax)
            d = amax * jnp.float32(np.float32(1.0 / plan.elem_max))
            d_bits = lax.bitcast_convert_type(d, jnp.int32)
            biased = ((d_bits >> 23) & 0xFF) - jnp.where(tiny, 64, 0)
            normal_byte = jnp.minimum(biased + ((d_bits & 0x7FFFFF) != 0).astype(jnp.int32), 254)
            sub_limit = jnp.where(tiny, jnp.float32(2.0**-63), jnp.float32(2.0**-127))
            byte = jnp.where(biased >= 1, normal_byte, (d > sub_limit).astype(jnp.int32))
            s = byte - 127
        # s <= 126 for every finite amax, so 2^-s is a normal float and x * 2^-s is exact.
        return s + 127, _pow2(jnp.maximum(-s, -126))

    div = _div_rn_ptx if plan.div == "ptx" else _div_rn_int
    tensor_scale, inv_tensor_scale = params[0], params[1]
    amax = lax.bitcast_convert_type(amax_bits, jnp.float32)
    per_block = div(div(amax, jnp.full_like(amax, _E2M1_MAX)), jnp.full_like(amax, tensor_scale))
    per_block = jnp.minimum(jnp.maximum(per_block, jnp.float32(_E4M3_MIN_NORMAL)), jnp.float32(_E4M3_MAX))
    if plan.scale_encode == "convert":  # RNE onto E4M3 by the FP8 convert (exact on sm_90+ and in XLA)
        code = lax.bitcast_convert_type(per_block.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)
    else:
        code = _encode_nearest(per_block, -6, 3, 8)  # RNE onto E4M3; >= 2^-6, so a normal code
    scale = lax.bitcast_convert_type((((code >> 3) + 120) << 23) | ((code & 7) << 20), jnp.float32)
    # torchao: x * ((1 / tensor_scale) / scale), one reciprocal per block
    return code, div(jnp.full_like(scale, inv_tensor_scale), scale)


def _kernel(*refs, plan: _Plan, n: int):
    refs = list(refs)
    params_ref = refs.pop(0) if plan.kind == "nvfp4" else None
    seeds_ref = refs.pop(0) if plan.rounding == "stochastic" else None
    x_ref = refs.pop(0)
    data_ref, scale_ref = (refs[0], None) if plan.values_dtype is not None else refs

    x_bits = lax.bitcast_convert_type(x_ref[...].astype(jnp.float32), jnp.int32)
    x_abs = x_bits & _ABS
    # One integer max per block: NaN/Inf bit patterns exceed every finite one, and non-negative
    # floats order like their bits, so the max is both the poison flag and the finite amax.
    # keepdims: per-block values keep the tile's rank (size-1 block axes), so they broadcast
    # against the tile and are stored as they are, without reshapes inside the kernel.
    block_max = jnp.max(x_abs, axis=plan.red_axes, keepdims=True)
    poisoned = block_max >= _F32_INF_BITS
    amax_bits = jnp.where(block_max < _F32_MIN_NORMAL_BITS, 0, block_max)  # f32 subnormals flush to 0
    params = None if params_ref is None else (params_ref[0], params_ref[1])
    scale_code, multiplier = _block_scales(amax_bits, params, plan)

    x = lax.bitcast_convert_type(jnp.where(x_abs < _F32_MIN_NORMAL_BITS, x_bits & _SIGN, x_bits), jnp.float32)
    y = x * multiplier
    if plan.prescale != 1.0:
        y = y * jnp.float32(plan.prescale)
    y = jnp.minimum(jnp.maximum(y, jnp.float32(-plan.elem_max)), jnp.float32(plan.elem_max))
    if plan.rounding == "nearest" and plan.encode == "convert":  # |y| <= max: no saturation involved
        codes = lax.bitcast_convert_type(y.astype(_FP8_BY_MBITS[plan.mbits]), jnp.uint8).astype(jnp.int32)
    elif plan.rounding == "nearest" and plan.encode == "threshold":
        codes = _encode_e2m1_threshold(y)
    elif plan.rounding == "nearest" and plan.encode == "magic":
        codes = _encode_magic(y, plan.emin, plan.mbits, plan.elem_bits)
    elif plan.rounding == "nearest":
        codes = _encode_nearest(y, plan.emin, plan.mbits, plan.elem_bits)
    else:
        index = _flat_index(y.shape, _program_origin(plan, n, y.shape), n, plan)
        u = uniform_from_bits(sr_hash(index, (seeds_ref[0], seeds_ref[1])))
        codes = _encode_stochastic(y, u, plan.emin, plan.mbits, plan.elem_bits)
    codes = jnp.where(poisoned, 0, codes)  # the NaN scale carries the poison
    if plan.values_dtype is not None:  # the emulated GEMM's operand: block values, no codes or scales
        data_ref[...] = _block_values(codes, scale_code, poisoned, plan).astype(plan.values_dtype)
        return
    if plan.pack > 1:  # element i of P in bits [i·b, (i+1)·b): even FP4 in the low nibble (lowbit.pack_fp4)
        shift = lax.broadcasted_iota(jnp.int32, codes.shape, codes.ndim - 1) * plan.code_bits
        codes = jnp.sum(codes << shift, axis=-1)  # disjoint bits: the (wrapping) sum is an OR
    data_ref[...] = codes if plan.words else codes.astype(jnp.uint8)
    nan_code = _E8M0_NAN if plan.kind == "mx" else _E4M3_NAN
    scale_ref[...] = jnp.where(poisoned, nan_code, scale_code).astype(jnp.uint8)


def _program_origin(plan: _Plan, n: int, tile: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(first row group, first block) of this program's tile; the grid is 1-D, row-major over tiles."""
    from jax.experimental import pallas as pl

    tiles_per_row = (n // plan.block) // tile[2]
    p = pl.program_id(0)
    return (p // tiles_per_row) * tile[0], (p % tiles_per_row) * tile[2]


# ----------------------------------------------------------------------------- public API
def _pallas_available() -> bool:
    try:
        from jax.experimental import pallas  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


_FP8_CONVERT_MIN_CC = 9.0  # Triton: float32 -> FP8 is the hardware's one RNE cvt from sm_90 on


def fp8_convert_is_exact(interpret: bool) -> bool:
    """Whether the kernels' float32 -> FP8 convert is one correctly rounded (RNE) step: always in interpret
    mode (XLA's cast); on a GPU from sm_90 on. Below, Triton rounds through f16 (twice) or refuses E4M3."""
    if interpret:
        return True
    return _gpu_compute_capability() >= _FP8_CONVERT_MIN_CC


def require_exact_convert(option: str, interpret: bool) -> None:
    """Refuse an explicit `option`='convert' where the float32 -> FP8 convert would not round exactly."""
    if not fp8_convert_is_exact(interpret):
        raise ValueError(f"{option}='convert' rounds exactly only on sm_90+ GPUs (this one is "
                         f"sm_{_gpu_compute_capability():g}); use {option}='integer' or 'auto'")


@functools.cache
def _gpu_compute_capability() -> float:
    """The first device's CUDA compute capability (9.0 on Hopper), 0.0 where none is reported."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", 0.0))
    except (TypeError, ValueError, RuntimeError):
        return 0.0


def normalized_axes(axis: Any, ndim: int) -> tuple[int, ...] | None:
    """lowbit.quantize's axis normalisation (sorted, non-negative), or None where it raises."""
    try:
        return _normalize_axes(axis, ndim)
    except ValueError:
        return None


def matrix_axes(shape: tuple[int, ...], axes: tuple[int, ...], block: int) -> tuple[int, ...] | None:
    """Kernel axes of x seen as the matrix [prod(shape[:-1]), shape[-1]], or None if that view would
    change which elements share a block: blocks must run along the last axis, and 2-D tiles over the
    last two axes must not straddle two leading (batch) indices, so rows % block == 0."""
    ndim = len(shape)
    if axes == (ndim - 1,):
        return (1,)
    if ndim >= 2 and axes == (ndim - 2, ndim - 1) and shape[-2] % block == 0:
        return (0, 1)
    return None


def fused_available(
    x: jax.Array,
    fmt: Format | str,
    axis: int | tuple[int, ...] = -1,
    *,
    scale_mode: str = "floor",
    rounding: str = "nearest",
    pad: bool = False,
    require_gpu: bool = True,
) -> bool:
    """Whether quantize_fused handles this call: 2-D float x, MX FP8/FP4 or NVFP4, blocks along the last
    axis (or block x block tiles) dividing the shape; with require_gpu also a GPU backend with Pallas Triton.
    """
    try:
        fmt = get_format(fmt)
    except ValueError:
        return False
    if fmt.kind not in _SUPPORTED_KINDS or fmt.storage_dtype != fmt.elem_dtype:  # FP6: XLA path
        return False
    if getattr(x, "ndim", None) != 2 or not any(x.dtype == d for d in _FLOAT_INPUTS):
        return False
    if rounding not in ROUNDINGS or scale_mode not in SCALE_MODES or pad:
        return False
    axes = normalized_axes(axis, 2)
    if axes not in ((1,), (0, 1)):
        return False
    if any(x.shape[a] % fmt.block_size or x.shape[a] == 0 for a in axes):
        return False
    if not _pallas_available():
        return False
    if require_gpu:
        return jax.default_backend() == "gpu" and _triton_available()
    return True


def quantize_fused(
    x: jax.Array,
    fmt: Format | str,
    scale_mode: str = "floor",
    rounding: str = "nearest",
    key: jax.Array | None = None,
    interpret: bool | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    prescale: float = 1.0,
    tensor_amax: jax.Array | None = None,
    div: str = "auto",
    encode: str = "auto",
    scale_encode: str = "auto",
    fp4_layout: str = "packed",
    store: str = "auto",
    block_rows: int | None = None,
    block_cols: int | None = None,
    num_warps: int | None = None,
    values_dtype: Any = None,
) -> QArray | BlockValues:
    """lowbit.quantize(x, fmt, axis, rounding, key, scale_mode, prescale=...) as one fused kernel.

    Same bits as lowbit.quantize for both roundings: SR hashes each element's flat index in x with
    the seeds lowbit.quantize derives from `key` (lowbit.quantize.sr_hash), in-kernel.
    `tensor_amax` (NVFP4): max |x| over finite elements if already known; else one XLA reduction.
    `encode`: RNE by integer ops on the float32 bits, by one float add of a power of two ("magic"), or
    (auto, round-to-nearest) the float32 -> FP8 convert for MXFP8 and midpoint compares for E2M1; same
    bits, held to ml_dtypes on every midpoint. `scale_encode`: NVFP4's E4M3 block scale, likewise.
    `store`: codes stored as int32 words or one byte at a time (same bits; auto: words for FP4, bytes for
    FP8).
    block_rows, block_cols, num_warps: the kernel's tile of x and its warps (None: DEFAULT_TILES).
    values_dtype (e.g. jnp.bfloat16): return BlockValues, data · block scale in that dtype, instead of codes
    and scales: the emulated GEMM's operand in one pass (x read once, values written once).
    interpret=None runs the compiled kernel on GPU and Pallas interpret mode elsewhere.
    """
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; choose one of {SCALE_MODES}")
    for name, value, choices in (("div", div, DIV_IMPLS), ("encode", encode, ENCODE_IMPLS),
                                 ("scale_encode", scale_encode, SCALE_ENCODES),
                                 ("fp4_layout", fp4_layout, FP4_LAYOUTS), ("store", store, STORES)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs fresh random bits: pass key=jax.random.key(...)")
    if not fused_available(x, fmt, axis, scale_mode=scale_mode, rounding=rounding, require_gpu=False):
        raise ValueError(
            f"quantize_fused does not handle {fmt.name} on a {x.dtype} array of shape {x.shape} with "
            f"axis={axis!r}: it needs a 2-D float array, an MX FP8/FP4 or NVFP4 format and blocks along "
            "the last axis (or block x block tiles) that divide the shape; use lowbit.quantize instead"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    axes = normalized_axes(axis, 2)
    plan = _Plan(
        kind=fmt.kind, block=fmt.block_size, tile_rows=fmt.block_size if axes == (0, 1) else 1,
        emin=fmt.emin, emax=fmt.emax, mbits=fmt.mbits, elem_bits=fmt.elem_bits,
        elem_max=fmt.elem_max, scale_mode=scale_mode if fmt.kind == "mx" else "floor",
        rounding=rounding, div=("int" if interpret else "ptx") if div == "auto" else div,
        encode=_resolve_encode(encode, fmt, rounding, bool(interpret)),
        scale_encode=_resolve_scale_encode(scale_encode, fmt, bool(interpret)),
        packed=fmt.elem_bits == 4 and fp4_layout == "packed" and values_dtype is None,
        words=_resolve_store(store, fmt) == "words" and values_dtype is None, prescale=float(prescale),
        values_dtype=None if values_dtype is None else checked_values_dtype(values_dtype),
    )
    if rounding == "nearest":
        key = None
    return _quantize_fused_jit(x, key, tensor_amax, fmt, axes, plan, bool(interpret),
                               *_resolve_tile(fmt, block_rows, block_cols, num_warps))


VALUES_DTYPES = ("bfloat16", "float16", "float32")


def checked_values_dtype(dtype: Any) -> str:
    """The name of a block-values dtype (a float the GEMM can take), or a ValueError naming the choices."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in VALUES_DTYPES:
        raise ValueError(f"values_dtype {name} cannot hold block values; use one of {VALUES_DTYPES}")
    return name


def _resolve_encode(encode: str, fmt, rounding: str, interpret: bool) -> str:
    """auto, round-to-nearest: the FP8 convert for 8-bit elements where it is exact (sm_90+), else the
    magic add (Hopper has no float32 -> FP4 convert; on an H200 the add beat the E2M1 compares 1.28x, the
    integer RNE 1.37x). Stochastic rounding has its own encoder. A choice that cannot apply, or would
    not be exact on this GPU, is refused."""
    nearest = rounding == "nearest"
    fp8 = nearest and fmt.elem_bits == 8 and fmt.mbits in _FP8_BY_MBITS
    e2m1 = nearest and (fmt.elem_bits, fmt.mbits, fmt.emin) == (4, 1, 0)
    if encode == "auto":
        if not nearest:
            return "integer"
        return "convert" if fp8 and fp8_convert_is_exact(interpret) else "magic"
    if encode == "convert" and not fp8:
        raise ValueError(f"encode='convert' is for round-to-nearest 8-bit elements (MXFP8); {fmt.name} with "
                         f"rounding={rounding!r} needs encode='integer' or 'auto'")
    if encode == "convert":
        require_exact_convert("encode", interpret)
    if encode == "threshold" and not e2m1:
        raise ValueError(f"encode='threshold' is for round-to-nearest E2M1 elements (MXFP4, NVFP4); "
                         f"{fmt.name} with rounding={rounding!r} needs encode='integer' or 'auto'")
    if encode == "magic" and not nearest:
        raise ValueError(f"encode='magic' is for round-to-nearest; rounding={rounding!r} needs "
                         "encode='integer' or 'auto'")
    return encode


def _resolve_store(store: str, fmt: Format) -> str:
    """auto: $LOWBIT_QUANTIZE_STORE if set, else words for FP4 and bytes for FP8 (both give the same bits)."""
    if store != "auto":
        return store
    env = os.environ.get(STORE_ENV_VAR, "").strip().lower()
    if env and env not in STORES[1:]:
        raise ValueError(f"${STORE_ENV_VAR}={env!r} is not a store; set it to one of {STORES[1:]} or unset "
                         "it")
    return env or ("words" if fmt.elem_bits == 4 else "bytes")


def _resolve_tile(fmt: Format, block_rows: int | None, block_cols: int | None,
                  num_warps: int | None) -> tuple[int, int, int]:
    """The given tile and warps, each None taken from DEFAULT_TILES for fmt's element width."""
    rows, cols, warps = DEFAULT_TILES[fmt.elem_bits]
    return (int(rows if block_rows is None else block_rows), int(cols if block_cols is None else block_cols),
            int(warps if num_warps is None else num_warps))


def _resolve_scale_encode(scale_encode: str, fmt, interpret: bool) -> str:
    """NVFP4's E4M3 block scale: auto takes the FP8 convert where it is exact, integer RNE elsewhere.
    MX formats' E8M0 scale is an exponent, not rounded: the option is unused there (and never refused)."""
    if fmt.kind != "nvfp4":
        return "unused"
    if scale_encode == "auto":
        return "convert" if fp8_convert_is_exact(interpret) else "integer"
    if scale_encode == "convert":
        require_exact_convert("scale_encode", interpret)
    return scale_encode


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8, 9))
def _quantize_fused_jit(x, key, tensor_amax, fmt, axes, plan, interpret, block_rows, block_cols,
                        num_warps) -> QArray:
    from jax.experimental import pallas as pl

    m, n = x.shape
    view = _view_shape(m, n, plan)
    rows_per_tile, blocks_per_tile, grid, tile_index = _tiling(view, plan.tile_rows, plan.block, block_rows,
                                                               block_cols)
    tile = (rows_per_tile, plan.tile_rows, blocks_per_tile, *view[3:])

    inputs, in_specs = [], []
    tensor_scale = None
    if plan.kind == "nvfp4":
        if tensor_amax is None:
            x_abs = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & _ABS
            finite_normal = (x_abs < _F32_INF_BITS) & (x_abs >= _F32_MIN_NORMAL_BITS)
            tensor_amax = lax.bitcast_convert_type(jnp.max(jnp.where(finite_normal, x_abs, 0)),
                                                   jnp.float32)
        tensor_scale = jnp.maximum(_div_rn(jnp.asarray(tensor_amax, jnp.float32), _E4M3_MAX * _E2M1_MAX),
                                   _NVFP4_MIN_TENSOR_SCALE).astype(jnp.float32)
        inputs.append(jnp.stack([tensor_scale, _div_rn(1.0, tensor_scale)]))
        in_specs.append(pl.BlockSpec((2,), lambda p: (0,)))
    if plan.rounding == "stochastic":
        inputs.append(sr_seeds(key))
        in_specs.append(pl.BlockSpec((2,), lambda p: (0,)))
    inputs.append(x.reshape(view))
    in_specs.append(pl.BlockSpec(tile, functools.partial(tile_index, rank=len(view))))

    data_view = view[:-1] if plan.pack > 1 else view
    data_tile = tile[:-1] if plan.pack > 1 else tile
    scale_view = tuple(1 if d in (1, 3, 4) else v for d, v in enumerate(view))
    scale_tile = tuple(1 if d in (1, 3, 4) else t for d, t in enumerate(tile))
    out_shape = (jax.ShapeDtypeStruct(data_view, jnp.int32 if plan.words else jnp.uint8),
                 jax.ShapeDtypeStruct(scale_view, jnp.uint8))
    out_specs = (pl.BlockSpec(data_tile, functools.partial(tile_index, rank=len(data_view))),
                 pl.BlockSpec(scale_tile, functools.partial(tile_index, rank=len(view))))
    if plan.values_dtype is not None:
        out_shape, out_specs = ((jax.ShapeDtypeStruct(view, jnp.dtype(plan.values_dtype)),),
                                (pl.BlockSpec(tile, functools.partial(tile_index, rank=len(view))),))
    compiler_params = None
    if not interpret and _triton_available():
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=num_warps)
    outs = pl.pallas_call(
        functools.partial(_kernel, plan=plan, n=n),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"lowbit_quantize_{fmt.name}" + ("_values" if plan.values_dtype else ""),
    )(*inputs)
    if plan.values_dtype is not None:
        return BlockValues(outs[0].reshape(m, n), tensor_scale, fmt, axes, plan.prescale)
    codes, scale_codes = outs

    if plan.words:  # int32 words -> their little-endian bytes, in order
        codes = lax.bitcast_convert_type(codes, jnp.uint8)
    if plan.packed:  # bytes -> pairs of E2M1, element 0 in the low nibble
        data = lax.bitcast_convert_type(codes.reshape(m, n // 2), fmt.storage_dtype).reshape(m, n)
    elif fmt.elem_bits == 4:
        data = lax.bitcast_convert_type(codes.reshape(m, n).astype(jnp.uint4), fmt.storage_dtype)
    else:
        data = lax.bitcast_convert_type(codes.reshape(m, n), fmt.storage_dtype)
    scale = lax.bitcast_convert_type(scale_codes.reshape(view[0], view[2]), fmt.scale_dtype)
    return QArray(data, scale, tensor_scale, fmt, axes, plan.prescale)
