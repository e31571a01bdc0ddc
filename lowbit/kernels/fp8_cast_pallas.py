"""Per-tensor FP8 cast (and transposed copy) as one Pallas (Triton) kernel: x read once, both layouts written.

q = RNE(clip(flush(x) · (1/s) · prescale, ±max)) with s the tensor scale lowbit.quantize computes
(amax / max, by an XLA reduction first), or a given (delayed) scale, with x's amax written per tile;
the codes come from the GPU's FP8 convert, one float add (quantize_pallas._encode_magic) or integer RNE on
the float32 bits (quantize_pallas._encode_nearest); the bits equal lowbit.quantize's. The transposed copy is
what cuBLASLt's TN-only FP8 GEMMs need for wgrad (Transformer Engine's cast_transpose). lowbit.dot
takes both layouts of X, W and dY from it through lowbit.kernels.dispatch.quantize_with_transpose.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.formats import Format, get_format
from lowbit.kernels.quantize_pallas import (
    _ABS,
    _F32_MIN_NORMAL_BITS,
    _SIGN,
    _encode_magic,
    _encode_nearest,
    _pow2_divisor,
    fp8_convert_is_exact,
    require_exact_convert,
)
from lowbit.quantize import QArray, _div_rn, _flush_subnormals, _per_tensor_scale

FP8_FORMATS = ("fp8", "fp8_e5m2")


ENCODES = ("auto", "integer", "convert", "magic")  # auto: convert where it is exact (sm_90+), else magic
_F32_INF_BITS = 0x7F800000
_AMAX_LANES = 16  # each tile writes its amax into a row this wide (Triton blocks: powers of two >= 16)


def _kernel(params_ref, x_ref, *out_refs, emin: int, mbits: int, elem_bits: int, elem_max: float,
            prescale: float, encode: str, storage_dtype, transpose: bool, scaled: bool, packed: bool):
    """x's tile is (bm, bn), or (bm/4, 4, bn) when `packed`: then the transposed tile is stored as int32 words
    of 4 row-consecutive codes (byte i = row 4j+i), (bn, bm/4), so its stores are 4 bytes wide, not 1."""
    x_bits = lax.bitcast_convert_type(x_ref[...].astype(jnp.float32), jnp.int32)
    x_abs = x_bits & _ABS
    normal = x_abs >= _F32_MIN_NORMAL_BITS
    if scaled:  # a given (delayed) scale: NaN/Inf encode as 0, the scale says the rest (see fp8_cast_scaled)
        finite = x_abs < _F32_INF_BITS
        x_bits = jnp.where(normal & finite, x_bits, x_bits & _SIGN)
    else:
        x_bits = jnp.where(normal, x_bits, x_bits & _SIGN)
    x = lax.bitcast_convert_type(x_bits, jnp.float32)
    y = x * params_ref[0]
    if prescale != 1.0:
        y = y * jnp.float32(prescale)
    y = jnp.minimum(jnp.maximum(y, jnp.float32(-elem_max)), jnp.float32(elem_max))
    if encode == "convert":  # the hardware's RNE float32 -> FP8 conversion (|y| <= max: no saturation)
        codes = lax.bitcast_convert_type(y.astype(storage_dtype), jnp.uint8)
    else:
        codes = (_encode_magic if encode == "magic" else _encode_nearest)(y, emin, mbits, elem_bits)
        codes = codes.astype(jnp.uint8)
    codes = jnp.where(params_ref[1] != 0, jnp.uint8(0), codes)  # poisoned: the NaN scale says so
    out_refs[0][...] = codes
    if transpose and packed:
        byte = lax.broadcasted_iota(jnp.int32, codes.shape, 1) * 8
        words = jnp.sum(codes.astype(jnp.int32) << byte, axis=1)  # disjoint bytes: the sum is an OR
        out_refs[1][...] = words.T
    elif transpose:
        out_refs[1][...] = codes.T
    if scaled:  # this tile's amax (float32 bits of non-negative floats order as integers) and NaN/Inf flag
        amax_ref, nonfinite_ref = out_refs[-2:]
        tile_amax = jnp.max(jnp.where(finite, x_bits & _ABS, 0))
        tile_bad = jnp.max(jnp.where(finite, 0, 1))
        amax_ref[...] = jnp.full(amax_ref.shape, tile_amax, jnp.int32)
        nonfinite_ref[...] = jnp.full(nonfinite_ref.shape, tile_bad, jnp.int32)


Block = int | tuple[int, int]  # a square tile's side, or (rows, cols)
# 128x64 tiles, 8 warps, the transposed copy stored as int32 words of 4 codes (see _kernel): the H200 sweep's
# best, 1.22-1.30x the 64x64 byte-store kernel on the moe-2.8b step's bf16 operands (docs/benchmarks.md)
DEFAULT_BLOCK: Block = (128, 64)
PACK_TRANSPOSE = True


def tiles(shape: tuple[int, ...], block: Block = DEFAULT_BLOCK) -> tuple[int, int]:
    """The kernel's (rows, cols) tile of [..., M, N]: the largest powers of two <= block (rows, cols) dividing
    M and N."""
    rows, cols = (block, block) if isinstance(block, int) else block
    return _pow2_divisor(shape[-2], rows), _pow2_divisor(shape[-1], cols)


def _pack(pack_transpose: bool | None) -> bool:
    return PACK_TRANSPOSE if pack_transpose is None else bool(pack_transpose)


def _static_block(block: Block) -> Block:
    return int(block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def _checked(x: jax.Array, fmt: Format | str, encode: str, interpret: bool | None) -> tuple[str, bool, str]:
    """(format name, interpret, resolved encode) after refusing what the kernel cannot take."""
    name = fmt.name if isinstance(fmt, Format) else fmt
    if name not in FP8_FORMATS:
        raise ValueError(f"fp8_cast handles per-tensor {FP8_FORMATS}, got {name!r}; use lowbit.quantize")
    if x.ndim < 2 or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"fp8_cast needs a float32/bfloat16/float16 array of rank >= 2 ([..., M, N]), got "
                         f"{x.dtype}{x.shape}; use lowbit.quantize")
    if x.size == 0:
        raise ValueError(f"fp8_cast needs a non-empty array, got shape {x.shape}; use lowbit.quantize")
    if encode not in ENCODES:
        raise ValueError(f"fp8_cast encode must be one of {ENCODES}, got {encode!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if encode == "convert":
        require_exact_convert("encode", interpret)
    if encode == "auto":
        encode = "convert" if fp8_convert_is_exact(interpret) else "magic"
    return name, bool(interpret), encode


def fp8_cast(x: jax.Array, fmt: Format | str = "fp8", *, transpose: bool = False, prescale: float = 1.0,
             interpret: bool | None = None, block: Block = DEFAULT_BLOCK, num_warps: int | None = 8,
             encode: str = "auto", pack_transpose: bool | None = None) -> tuple[QArray, QArray | None]:
    """lowbit.quantize(x, fmt) for per-tensor FP8 on x [..., M, N], plus (transpose=True) the same
    QArray of swapaxes(x, -1, -2), one scale for the whole tensor.

    Returns (q, q_t or None). One XLA amax reduction, then one kernel that writes both layouts; its
    tiles are `tiles(x.shape, block)` (Triton blocks are powers of two), leading dims a grid axis.
    encode: "convert" (the GPU's RNE cvt to FP8, exact from sm_90 on), "magic" (one float add) or "integer"
    (RNE on the float32 bits); same bits, the convert 1.5x faster than integer on an H100
    (tools/bench_fp8_cast.py; 64x64 tiles, 8 warps). "auto" takes the convert where it is exact, else magic.
    pack_transpose (None: PACK_TRANSPOSE): the kernel stores the transposed copy 4 codes per int32 word.
    """
    name, interpret, encode = _checked(x, fmt, encode, interpret)
    q, q_t, _ = _fp8_cast_jit(x, None, name, bool(transpose), float(prescale), interpret,
                              _static_block(block), num_warps, encode, _pack(pack_transpose))
    return q, q_t


def fp8_cast_scaled(x: jax.Array, fmt: Format | str, tensor_scale: jax.Array, *, transpose: bool = False,
                    prescale: float = 1.0, interpret: bool | None = None, block: Block = DEFAULT_BLOCK,
                    num_warps: int | None = 8, encode: str = "auto", pack_transpose: bool | None = None,
                    ) -> tuple[QArray, QArray | None, jax.Array]:
    """lowbit.scaling.quantize_scaled(x, fmt, tensor_scale) in one read of x: (q, q_t or None, amax).

    No reduction before the kernel (delayed scaling): each tile also writes its amax and a NaN/Inf flag,
    reduced afterwards over 1/256 of x's size. Same bits, scale and amax as quantize_scaled.
    """
    name, interpret, encode = _checked(x, fmt, encode, interpret)
    return _fp8_cast_jit(x, jnp.asarray(tensor_scale, jnp.float32), name, bool(transpose), float(prescale),
                         interpret, _static_block(block), num_warps, encode, _pack(pack_transpose))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8, 9))
def _fp8_cast_jit(x, given_scale, name, transpose, prescale, interpret, block, num_warps, encode, pack):
    from jax.experimental import pallas as pl

    fmt = get_format(name)
    *lead, m, n = x.shape
    scaled = given_scale is not None
    if scaled:
        tensor_scale = given_scale
        params = jnp.stack([_div_rn(1.0, tensor_scale), jnp.float32(0)])
    else:
        # lowbit.quantize's own scale; a poisoned tensor's NaN reciprocal is harmless (its codes are zeroed)
        tensor_scale, poisoned = _per_tensor_scale(_flush_subnormals(x.astype(jnp.float32)), fmt)
        params = jnp.stack([_div_rn(1.0, tensor_scale), poisoned.astype(jnp.float32)])

    batch = math.prod(lead)
    bm, bn = tiles(x.shape, block)
    packed = bool(pack and transpose and bm >= 4)
    tiles_m, tiles_n = m // bm, n // bn
    per_batch = tiles_m * tiles_n
    grid = (batch * per_batch,)  # 1-D, row-major over (batch, tile row, tile col)

    def tile_of(p):
        return p // per_batch, (p // tiles_n) % tiles_m, p % tiles_n

    if packed:  # rows in groups of 4 (a free reshape): (batch, m/4, 4, n)
        x_view = x.reshape(batch, m // 4, 4, n)
        out_specs = [pl.BlockSpec((None, bm // 4, 4, bn), lambda p: (*tile_of(p)[:2], 0, tile_of(p)[2]))]
    else:
        x_view = x.reshape(batch, m, n)
        out_specs = [pl.BlockSpec((None, bm, bn), tile_of)]
    out_shape = [jax.ShapeDtypeStruct(x_view.shape, jnp.uint8)]
    if transpose:
        rows_t, dtype_t = (m // 4, jnp.int32) if packed else (m, jnp.uint8)
        out_shape.append(jax.ShapeDtypeStruct((batch, n, rows_t), dtype_t))
        out_specs.append(pl.BlockSpec((None, bn, bm // 4 if packed else bm),
                                      lambda p: (p // per_batch, p % tiles_n, (p // tiles_n) % tiles_m)))
    if scaled:
        for _ in range(2):  # per-tile amax bits, per-tile NaN/Inf flag
            out_shape.append(jax.ShapeDtypeStruct((grid[0], _AMAX_LANES), jnp.int32))
            out_specs.append(pl.BlockSpec((None, _AMAX_LANES), lambda p: (p, 0)))
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=num_warps)
    outs = pl.pallas_call(
        functools.partial(_kernel, emin=fmt.emin, mbits=fmt.mbits, elem_bits=fmt.elem_bits,
                          elem_max=fmt.elem_max, prescale=prescale, encode=encode,
                          storage_dtype=fmt.storage_dtype, transpose=transpose, scaled=scaled, packed=packed),
        out_shape=out_shape, grid=grid,
        in_specs=[pl.BlockSpec((2,), lambda p: (0,)), out_specs[0]],  # x's tiles are q's
        out_specs=out_specs, interpret=interpret, compiler_params=compiler_params,
        name=f"lowbit_cast_{fmt.name}" + ("_scaled" if scaled else ""),
    )(params, x_view)

    amax = None
    if scaled:
        amax = lax.bitcast_convert_type(jnp.max(outs[-2]), jnp.float32)
        tensor_scale = jnp.where(jnp.max(outs[-1]) != 0, jnp.nan, tensor_scale).astype(jnp.float32)

    def qarray(codes, shape):
        data = lax.bitcast_convert_type(codes, fmt.storage_dtype).reshape(shape)
        return QArray(data, None, tensor_scale, fmt, tuple(range(x.ndim)), prescale)

    q = qarray(outs[0], x.shape)
    if not transpose:
        return q, None, amax
    codes_t = lax.bitcast_convert_type(outs[1], jnp.uint8) if packed else outs[1]  # little-endian bytes
    return q, qarray(codes_t, (*lead, n, m)), amax
