"""x -> QArray(data, scale, tensor_scale) and back, bit-exact to the OCP MX v1.0 and NVFP4 definitions.

Scales: MX "floor" is OCP MX v1.0 sec. 6.3 (shared exponent = floor(log2 amax) - emax, from the
float32 exponent bits); "rceil" is NVIDIA's round-up rule (cvt.rp.satfinite.ue8m0x2.f32 on
amax / elem_max). NVFP4: tensor scale amax/(448*6), E4M3 block scale (block_amax/6)/tensor_scale
(arXiv 2509.25149 sec. 2; torchao nvfp4_quantize). Elements: round-to-nearest-even or stochastic
rounding onto the element grid; SR's u comes from a counter hash of the element's flat index in x
(sr_uniform), shared with the fused kernel. Exact semantics and choices: docs/numerics.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.formats import Format, get_format

ROUNDINGS = ("nearest", "stochastic")
SCALE_MODES = ("floor", "rceil")
_FLOAT_INPUTS = (jnp.float32, jnp.bfloat16, jnp.float16)
_F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # 2^-126
_NVFP4_MIN_TENSOR_SCALE = 2.0**-120  # keeps 1 / (tensor_scale * 2^-6) finite for all-zero tensors
_E8M0_NAN = 255
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_MAX = 448.0
_E2M1_MAX = 6.0


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized tensor: x ≈ data · scale (broadcast over blocks along `axis`) · tensor_scale / prescale.

    `data` has the shape of x and the format's element dtype (FP6: an FP8 container, see Format);
    `scale` has x's shape with each block axis divided by the block size (None for per-tensor FP8);
    `tensor_scale` is a float32 scalar for NVFP4 and FP8, else None.
    """

    data: jax.Array
    scale: jax.Array | None
    tensor_scale: jax.Array | None
    fmt: Format
    axis: tuple[int, ...]
    prescale: float = 1.0

    def tree_flatten(self):
        return (self.data, self.scale, self.tensor_scale), (self.fmt, self.axis, self.prescale)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Storage bytes with FP4/FP6 elements packed densely and 8-bit scales."""
        n = int(np.prod(self.shape)) * self.fmt.elem_bits // 8
        n += 0 if self.scale is None else int(np.prod(self.scale.shape))
        return n + (0 if self.tensor_scale is None else 4)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BlockValues:
    """A QArray's block values, the operand of an emulated GEMM: x ≈ values · tensor_scale / prescale.

    values = data · scale (per block) in a compute dtype: exact in bfloat16 wherever the value is a normal
    number (<= 6 significant bits), as lowbit.backends.emulate.split_scales computes them from a QArray.
    """

    values: jax.Array
    tensor_scale: jax.Array | None
    fmt: Format
    axis: tuple[int, ...]
    prescale: float = 1.0

    def tree_flatten(self):
        return (self.values, self.tensor_scale), (self.fmt, self.axis, self.prescale)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


# ----------------------------------------------------------------------------- float32 bit helpers
def _exponent(x: jax.Array) -> jax.Array:
    """Unbiased exponent field of float32 x (floor(log2|x|) for normal x; -127 for 0)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF) - 127


def _pow2(k: jax.Array) -> jax.Array:
    """2^k as float32 from the exponent bits, k int32 in [-126, 127]."""
    return lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def _mul_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """x · 2^k exactly for k in [-252, 252], in two normal factors (no subnormal 2^-127 constant)."""
    k = k.astype(jnp.int32)
    half = k // 2
    return x * _pow2(half) * _pow2(k - half)


def _div_rn(a: jax.Array | float, b: jax.Array | float) -> jax.Array:
    """a / b correctly rounded (RNE) for a >= 0 and normal b > 0, exact on every backend.

    XLA's float division is neither stable nor IEEE across backends (it rewrites a / c into
    a * (1/c), and the GPU's f32 divide is not correctly rounded), so the few per-block and
    per-tensor divisions of the NVFP4/FP8 definitions are done on the 24-bit mantissas: a float
    estimate of the quotient, its exact remainder in wrapping int32 arithmetic, a correction,
    then round-half-even. Subnormal quotients flush to zero (callers clamp them away).
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    a_bits = lax.bitcast_convert_type(a, jnp.int32)
    b_bits = lax.bitcast_convert_type(b, jnp.int32)
    a_man = (a_bits & 0x7FFFFF) | 0x800000
    b_man = (b_bits & 0x7FFFFF) | 0x800000
    small = a_man < b_man  # normalise so the quotient a_man / b_man lies in [1, 2)
    a_man = jnp.where(small, a_man << 1, a_man)
    exp = ((a_bits >> 23) & 0xFF) - ((b_bits >> 23) & 0xFF) + 127 - small.astype(jnp.int32)
    # quot = floor(a_man * 2^23 / b_man) in [2^23, 2^24): estimate within a few units, then fix
    # it with the remainder, which is small, so wrapping int32 products give it exactly.
    estimate = a_man.astype(jnp.float32) / b_man.astype(jnp.float32) * np.float32(2.0**23)
    quot = jnp.clip(estimate.astype(jnp.int32), 1 << 23, (1 << 24) - 1)
    rem = (a_man << 23) - quot * b_man
    for _ in range(4):  # estimate error in [-3, 2] units even for a 2-ulp divide; one unit a step
        low, high = rem < 0, rem >= b_man
        quot = quot - low.astype(jnp.int32) + high.astype(jnp.int32)
        rem = rem + jnp.where(low, b_man, 0) - jnp.where(high, b_man, 0)
    twice_rem = rem << 1
    round_up = (twice_rem > b_man) | ((twice_rem == b_man) & ((quot & 1) == 1))
    quot = quot + round_up.astype(jnp.int32)
    carry = quot >> 24
    quot, exp = jnp.where(carry == 1, quot >> 1, quot), exp + carry
    bits = (exp << 23) | (quot & 0x7FFFFF)
    out = lax.bitcast_convert_type(bits, jnp.float32)
    out = jnp.where(exp >= 255, jnp.inf, jnp.where(exp <= 0, 0.0, out))
    return jnp.where(a == 0, 0.0, out)


def _flush_subnormals(x: jax.Array) -> jax.Array:
    """Float32 subnormals -> signed zero (XLA CPU flushes them anyway; done explicitly everywhere)."""
    return jnp.where(jnp.abs(x) < _F32_MIN_NORMAL, jnp.copysign(jnp.zeros_like(x), x), x)


# ----------------------------------------------------------------------------- SR random bits
# One definition for lowbit.quantize and the fused kernel (lowbit.kernels.quantize_pallas), so both
# round every element the same way: u(p) = top 23 bits of mix32(mix32(p ^ s0) ^ s1), p the
# element's C-order flat index in the quantized x (uint32, wrapping), (s0, s1) drawn from the key.
def sr_seeds(key: jax.Array) -> jax.Array:
    """The two uint32 seeds (s0, s1) of SR's counter hash: jax.random.bits(key, (2,), uint32)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def mix32(h: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons' hash-prospector): a uint32 bijection in which every input bit flips
    about half the output bits; h ^= h>>16; h *= 0x7feb352d; h ^= h>>15; h *= 0x846ca68b; h ^= h>>16."""
    h = h ^ lax.shift_right_logical(h, jnp.uint32(16))
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ lax.shift_right_logical(h, jnp.uint32(15))
    h = h * jnp.uint32(0x846CA68B)
    return h ^ lax.shift_right_logical(h, jnp.uint32(16))


def sr_hash(index: jax.Array, seeds: tuple[jax.Array, jax.Array] | jax.Array) -> jax.Array:
    """Random uint32 of the element with flat index `index` (uint32): two keyed rounds of mix32,
    bits = mix32(mix32(index ^ s0) ^ s1)."""
    return mix32(mix32(index ^ seeds[0]) ^ seeds[1])


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """u in [0, 1) from the top 23 of 32 random bits, as jax.random.uniform builds it: f32(1.m) - 1."""
    one_bits = lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return lax.bitcast_convert_type(one_bits, jnp.float32) - jnp.float32(1.0)


def flat_index(shape: Sequence[int]) -> jax.Array:
    """uint32 array of `shape` holding each position's C-order flat index mod 2^32 (iotas: XLA fuses it)."""
    index = jnp.zeros(tuple(shape), jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, tuple(shape), d) * np.uint32(stride % 2**32)
        stride *= int(shape[d])
    return index


def sr_uniform(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """SR's u for an array of `shape`: uniform_from_bits(sr_hash(flat_index(shape), sr_seeds(key)))."""
    return uniform_from_bits(sr_hash(flat_index(shape), sr_seeds(key)))


# ----------------------------------------------------------------------------- rounding
def round_to_grid(
    y: jax.Array, fmt: Format, rounding: str = "nearest", key: jax.Array | None = None,
    index: jax.Array | None = None,
) -> jax.Array:
    """Round float32 y (already within ±elem_max) onto fmt's element grid.

    ulp(y) = 2^(max(E(|y|), emin) - mbits); nearest: rint(y/ulp)·ulp (ties to even);
    stochastic: floor(y/ulp) + [u < frac], u = uniform_from_bits(sr_hash(index, sr_seeds(key))),
    so E[q] = y. `index`: each element's flat index in the original x (default: flat_index(y.shape)).
    """
    ulp_exp = jnp.maximum(_exponent(y), fmt.emin) - fmt.mbits
    t = _mul_pow2(y, -ulp_exp)
    if rounding == "nearest":
        r = jnp.round(t)
    else:
        index = flat_index(t.shape) if index is None else index
        u = uniform_from_bits(sr_hash(index, sr_seeds(key)))
        floor_t = jnp.floor(t)
        r = floor_t + (u < t - floor_t).astype(jnp.float32)
    return _mul_pow2(r, ulp_exp)


# ----------------------------------------------------------------------------- blocking
def _normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    if not 1 <= len(axes) <= 2:
        raise ValueError(f"axis must be an int or a pair of ints for 2-D tiles, got {axis!r}")
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names the same dimension twice")
    return tuple(sorted(out))


def _check_divisible(shape: Sequence[int], axes: tuple[int, ...], fmt: Format, pad: bool) -> None:
    for a in axes:
        if shape[a] % fmt.block_size and not pad:
            raise ValueError(
                f"axis {a} has size {shape[a]}, not a multiple of the block size {fmt.block_size} "
                f"of {fmt.name}; pass pad=True to quantize the last partial block as if "
                f"zero-padded, or reshape so the blocked axis divides by {fmt.block_size}"
            )


def _pad_to_blocks(x: jax.Array, axes: tuple[int, ...], block: int) -> jax.Array:
    widths = [(0, -x.shape[a] % block if a in axes else 0) for a in range(x.ndim)]
    return jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x


def _split_blocks(x: jax.Array, axes: tuple[int, ...], block: int):
    """Reshape each block axis a into (a / block, block); return the view and the in-block dims."""
    shape = list(x.shape)
    for a in reversed(axes):
        shape[a : a + 1] = [shape[a] // block, block]
    inner = tuple(a + i + 1 for i, a in enumerate(axes))
    return x.reshape(shape), inner


def _unsplit(xb: jax.Array, shape: Sequence[int], orig_shape: Sequence[int]) -> jax.Array:
    x = xb.reshape(shape)
    if tuple(shape) != tuple(orig_shape):
        x = x[tuple(slice(0, n) for n in orig_shape)]
    return x


# ----------------------------------------------------------------------------- scales
def _mx_scale_exponent(block_amax: jax.Array, fmt: Format, scale_mode: str) -> jax.Array:
    """Unbiased E8M0 exponent s in [-127, 127] of each block (finite amax)."""
    if scale_mode == "floor":
        return jnp.clip(_exponent(block_amax) - fmt.emax, -127, 127)
    # rceil: byte = round-up-to-power-of-two of d = f32(amax * f32(1/max)). Tiny amax is scaled by
    # 2^64 first so that d never becomes a float32 subnormal that XLA would flush to zero.
    tiny = block_amax < 2.0**-64
    amax = jnp.where(tiny, block_amax * np.float32(2.0**64), block_amax)
    d = amax * np.float32(1.0 / fmt.elem_max)
    bits = lax.bitcast_convert_type(d, jnp.int32)
    mantissa = bits & 0x7FFFFF
    biased = ((bits >> 23) & 0xFF) - jnp.where(tiny, 64, 0)
    normal_byte = jnp.minimum(biased + (mantissa != 0), 254)
    # d below 2^-126: byte 1 (2^-126) if d > 2^-127, else byte 0 (2^-127; also d == 0).
    sub_byte = (d > jnp.where(tiny, np.float32(2.0**-63), np.float32(2.0**-127))).astype(jnp.int32)
    byte = jnp.where(biased >= 1, normal_byte, sub_byte)
    return byte - 127


def _e8m0_from_exponent(s: jax.Array, poisoned: jax.Array) -> jax.Array:
    byte = jnp.where(poisoned, _E8M0_NAN, s + 127).astype(jnp.uint8)
    return lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)


def _e8m0_exponent(scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    byte = lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)
    return byte - 127, byte == _E8M0_NAN


# ----------------------------------------------------------------------------- quantize
def _check_args(x: jax.Array, rounding: str, key: jax.Array | None, scale_mode: str) -> None:
    if not any(x.dtype == d for d in _FLOAT_INPUTS):
        raise TypeError(
            f"quantize expects a float32, bfloat16 or float16 array, got dtype {x.dtype}; "
            "cast it first (e.g. x.astype(jnp.float32))"
        )
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; choose one of {SCALE_MODES}")
    if rounding == "stochastic" and key is None:
        raise ValueError(
            "rounding='stochastic' needs fresh random bits: pass key=jax.random.key(...) "
            "(a new key every step, e.g. from the Flax RNG stream 'quant')"
        )


def quantize(
    x: jax.Array,
    fmt: Format | str,
    axis: int | Sequence[int] = -1,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    scale_mode: str = "floor",
    *,
    pad: bool = False,
    prescale: float = 1.0,
) -> QArray:
    """Quantize x to `fmt` with blocks along `axis` (a pair of axes gives 2-D block x block tiles).

    MX: x ≈ data · 2^s per block; NVFP4: x ≈ data · e4m3_scale · tensor_scale; FP8: x ≈ data · tensor_scale.
    `prescale` multiplies the scaled values before rounding (Tseng et al. 2025 use 3/4 with SR).
    """
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    _check_args(x, rounding, key, scale_mode)
    axes = _normalize_axes(axis, x.ndim) if fmt.kind != "tensor" else ()
    _check_divisible(x.shape, axes, fmt, pad)
    # One jitted program per static configuration: eager calls would compile op by op.
    return _quantize_jit(x, key, fmt, axes, rounding, scale_mode, pad, float(prescale))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _quantize_jit(x, key, fmt, axes, rounding, scale_mode, pad, prescale) -> QArray:
    xf = _flush_subnormals(x.astype(jnp.float32))
    if fmt.kind == "tensor":
        return _quantize_per_tensor(xf, fmt, rounding, key, prescale)

    xp = _pad_to_blocks(xf, axes, fmt.block_size)
    xb, inner = _split_blocks(xp, axes, fmt.block_size)
    # SR: each element's flat index in x goes through the same padding and blocking as x itself,
    # so x[p] is rounded with u(p) however it is blocked (the fused kernel draws the same u).
    index = None
    if rounding == "stochastic":
        index, _ = _split_blocks(_pad_to_blocks(flat_index(x.shape), axes, fmt.block_size), axes,
                                 fmt.block_size)
    finite = jnp.isfinite(xb)
    abs_finite = jnp.where(finite, jnp.abs(xb), 0.0)
    block_amax = jnp.max(abs_finite, axis=inner, keepdims=True)
    poisoned = ~jnp.all(finite, axis=inner, keepdims=True)

    tensor_scale = None
    if fmt.kind == "mx":
        s = _mx_scale_exponent(block_amax, fmt, scale_mode)
        y = _mul_pow2(xb, -s)
        scale = _e8m0_from_exponent(s, poisoned)
    else:  # nvfp4: two-level scaling
        tensor_amax = jnp.max(abs_finite)
        tensor_scale = jnp.maximum(
            _div_rn(tensor_amax, _E4M3_MAX * _E2M1_MAX), _NVFP4_MIN_TENSOR_SCALE
        )
        block_scale = _div_rn(_div_rn(block_amax, _E2M1_MAX), tensor_scale)
        block_scale = jnp.clip(block_scale, _E4M3_MIN_NORMAL, _E4M3_MAX)
        block_scale = round_to_grid(block_scale, get_format("fp8"))  # RNE onto E4M3
        # torchao: x * ((1 / tensor_scale) / block_scale), one reciprocal per block.
        recip = _div_rn(_div_rn(1.0, tensor_scale), block_scale)
        # Materialise the per-block reciprocal so XLA does not redo the exact division per element.
        recip, block_scale, poisoned = lax.optimization_barrier((recip, block_scale, poisoned))
        y = xb * recip
        scale = jnp.where(poisoned, jnp.nan, block_scale).astype(fmt.scale_dtype)

    data = _round_elements(jnp.where(poisoned, 0.0, y), fmt, rounding, key, prescale, index)
    data = _unsplit(data, xp.shape, x.shape).astype(fmt.storage_dtype)
    scale = jnp.squeeze(scale, axis=inner)
    return QArray(data, scale, tensor_scale, fmt, axes, float(prescale))


def _round_elements(y, fmt, rounding, key, prescale, index=None) -> jax.Array:
    if prescale != 1.0:
        y = y * np.float32(prescale)
    y = jnp.clip(y, -fmt.elem_max, fmt.elem_max)
    return round_to_grid(y, fmt, rounding, key, index)


def _finite_amax(xf, initial: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(max |xf| over the finite elements of flushed float32 xf, whether any is NaN/Inf); `initial`:
    jnp.max's value for an empty xf (None: an empty xf is an error)."""
    finite = jnp.isfinite(xf)
    return jnp.max(jnp.where(finite, jnp.abs(xf), 0.0), initial=initial), ~jnp.all(finite)


def _scale_of_amax(amax, fmt) -> jax.Array:
    """s = amax / elem_max (correctly rounded, >= the smallest normal) for a finite amax >= 0; 1 for 0."""
    return jnp.where(amax == 0, 1.0, jnp.maximum(_div_rn(amax, fmt.elem_max), _F32_MIN_NORMAL))


def _per_tensor_scale(xf, fmt) -> tuple[jax.Array, jax.Array]:
    """(tensor scale, poisoned) of flushed float32 xf: s = amax / elem_max over the finite values (1 for
    an all-zero tensor, at least the smallest normal), NaN when any element is NaN/Inf."""
    amax, poisoned = _finite_amax(xf)
    return jnp.where(poisoned, jnp.nan, _scale_of_amax(amax, fmt)).astype(jnp.float32), poisoned


def _quantize_per_tensor(xf, fmt, rounding, key, prescale) -> QArray:
    tensor_scale, poisoned = _per_tensor_scale(xf, fmt)
    y = jnp.where(poisoned, 0.0, xf * _div_rn(1.0, tensor_scale))
    data = _round_elements(y, fmt, rounding, key, prescale).astype(fmt.storage_dtype)
    return QArray(data, None, tensor_scale, fmt, tuple(range(xf.ndim)), float(prescale))


# ----------------------------------------------------------------------------- dequantize
def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
    """x̂ = data · scale (per block) · tensor_scale / prescale, cast to dtype."""
    fmt = q.fmt
    data = q.data.astype(jnp.float32)
    if fmt.kind == "tensor":
        out = data * q.tensor_scale
    else:
        block = fmt.block_size
        padded = _pad_to_blocks(data, q.axis, block)
        db, inner = _split_blocks(padded, q.axis, block)
        scale = jnp.expand_dims(q.scale, inner)
        if fmt.kind == "mx":
            s, is_nan = _e8m0_exponent(scale)
            ob = jnp.where(is_nan, jnp.nan, _mul_pow2(db, s))
        else:
            ob = db * (q.tensor_scale * scale.astype(jnp.float32))
        out = _unsplit(ob, padded.shape, data.shape)
    if q.prescale != 1.0:
        out = out / np.float32(q.prescale)
    return out.astype(dtype)


def qdq(x: jax.Array, fmt: Format | str, **kwargs: Any) -> jax.Array:
    """Fake quantization: dequantize(quantize(x, fmt, **kwargs)) in x's dtype."""
    x = jnp.asarray(x)
    return dequantize(quantize(x, fmt, **kwargs), x.dtype)


# ----------------------------------------------------------------------------- FP4 packing
def pack_fp4(data: jax.Array) -> jax.Array:
    """Two E2M1 codes per byte along the last axis, the even element in the low nibble."""
    if data.dtype != jnp.float4_e2m1fn:
        raise TypeError(f"pack_fp4 expects float4_e2m1fn data, got {data.dtype}")
    if data.shape[-1] % 2:
        raise ValueError(
            f"pack_fp4 needs an even last axis to pair elements, got size {data.shape[-1]}"
        )
    codes = lax.bitcast_convert_type(data, jnp.uint4).astype(jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """Inverse of pack_fp4: uint8 [..., n/2] -> float4_e2m1fn [..., n]."""
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_fp4 expects uint8 bytes, got {packed.dtype}")
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2).astype(jnp.uint4)
    return lax.bitcast_convert_type(codes, jnp.float4_e2m1fn)
