"""Plain-NumPy reference of lowbit's quantization formats (no jax): the spec, written out slowly.

Element grids are enumerated from ml_dtypes bit patterns and rounding is a search over that grid
(ties to the even code), so this shares nothing with lowbit but the spec (docs/numerics.md).
Arithmetic the spec does "in float32" is done with numpy float32 scalars/arrays (IEEE, no flush).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_dtypes
import numpy as np

F32_MIN_NORMAL = 2.0**-126
NVFP4_TENSOR_DIVISOR = 448.0 * 6.0  # E4M3 max * E2M1 max (NVIDIA NVFP4 two-level scaling)
# Smallest NVFP4 tensor scale: 2^-126 / 2^-6, so the element divisor ts * s (s >= 2^-6) is a normal
# float32; a subnormal divisor is flushed to 0 by XLA (x / 0 = inf). Documented choice.
NVFP4_TENSOR_SCALE_FLOOR = 2.0**-120
E8M0_NAN_BYTE = 255

ELEM_DTYPES = {
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
}

# name -> (kind, element dtype, block size); the format table of docs/numerics.md.
REF_FORMATS = {
    "mxfp8": ("mx", ml_dtypes.float8_e4m3fn, 32),
    "mxfp8_e5m2": ("mx", ml_dtypes.float8_e5m2, 32),
    "mxfp6_e2m3": ("mx", ml_dtypes.float6_e2m3fn, 32),
    "mxfp6_e3m2": ("mx", ml_dtypes.float6_e3m2fn, 32),
    "mxfp4": ("mx", ml_dtypes.float4_e2m1fn, 32),
    "nvfp4": ("nvfp4", ml_dtypes.float4_e2m1fn, 16),
    "fp8": ("tensor", ml_dtypes.float8_e4m3fn, 0),
    "fp8_e5m2": ("tensor", ml_dtypes.float8_e5m2, 0),
}


# ----------------------------------------------------------------------------- element grids


@functools.cache
def elem_grid(elem) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite values of `elem` (ascending, float64) and their bit codes.

    Enumerates every code with the sign bit clear; codes of positive floats increase with value.
    """
    nbits = ml_dtypes.finfo(elem).bits
    codes = np.arange(2 ** (nbits - 1), dtype=np.uint8)
    values = codes.view(elem).astype(np.float64)
    finite = np.isfinite(values)
    values, codes = values[finite], codes[finite]
    assert np.all(np.diff(values) > 0), "positive codes must be ordered by value"
    return values, codes


@functools.cache
def signed_grid(elem) -> np.ndarray:
    """All distinct finite values of `elem`, ascending (a single zero)."""
    values, _ = elem_grid(elem)
    return np.concatenate([-values[:0:-1], values])


def elem_max(elem) -> float:
    return float(elem_grid(elem)[0][-1])


def elem_emax(elem) -> int:
    """Exponent of the binade of the largest finite value (OCP MX emax_elem)."""
    return int(np.floor(np.log2(elem_max(elem))))


def ref_round_to_grid(y, elem) -> np.ndarray:
    """Round-to-nearest-even onto `elem`'s grid by search; saturates to +-max; signed zero kept.

    Ties go to the neighbour whose bit code is even (the IEEE definition of "even").
    """
    y = np.asarray(y, dtype=np.float64)
    values, codes = elem_grid(elem)
    mag = np.minimum(np.abs(y), values[-1])
    mag_safe = np.where(np.isnan(mag), 0.0, mag)
    hi_idx = np.clip(np.searchsorted(values, mag_safe, side="left"), 0, len(values) - 1)
    lo_idx = np.maximum(hi_idx - 1, 0)
    hi, lo = values[hi_idx], values[lo_idx]
    d_hi, d_lo = hi - mag_safe, mag_safe - lo
    hi_even = (codes[hi_idx] % 2) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & hi_even)
    rounded = np.where(hi == mag_safe, hi, np.where(pick_hi, hi, lo))
    out = np.copysign(rounded, y)
    return np.where(np.isnan(y), np.nan, out)


def ref_stochastic_round(y, elem, u) -> np.ndarray:
    """Stochastic rounding onto `elem`'s grid: lo + (hi - lo) * [u < (y - lo) / (hi - lo)].

    lo <= y <= hi are the signed grid neighbours (y saturated to +-max first); u in [0, 1).
    The sign of a zero result is not specified (compare values, not bits, for zeros).
    """
    y = np.asarray(y, dtype=np.float64)
    grid = signed_grid(elem)
    y = np.clip(y, grid[0], grid[-1])
    hi_idx = np.clip(np.searchsorted(grid, y, side="left"), 0, len(grid) - 1)
    on_grid = grid[hi_idx] == y
    lo_idx = np.where(on_grid, hi_idx, np.maximum(hi_idx - 1, 0))
    hi, lo = grid[hi_idx], grid[lo_idx]
    gap = np.where(on_grid, 1.0, hi - lo)
    frac = np.where(on_grid, 0.0, (y - lo) / gap)
    return np.where(np.asarray(u, np.float64) < frac, hi, lo)


def ref_grid_neighbours(y, elem) -> tuple[np.ndarray, np.ndarray]:
    """(largest grid value <= y, smallest grid value >= y) for y inside [-max, max]."""
    grid = signed_grid(elem)
    y = np.asarray(y, dtype=np.float64)
    lo = grid[np.searchsorted(grid, y, side="right") - 1]
    hi = grid[np.searchsorted(grid, y, side="left")]
    return lo, hi


def ref_encode(values, elem) -> np.ndarray:
    """Bit codes (uint8) of grid values in `elem` (exact cast; signed zeros kept)."""
    return np.asarray(values, np.float64).astype(elem).view(np.uint8)


# ----------------------------------------------------------------------------- float32 helpers


def f32_fields(x) -> tuple[np.ndarray, np.ndarray]:
    """(biased exponent field, mantissa field) of float32 x, from its bit pattern."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    return (bits >> 23) & 0xFF, bits & 0x7FFFFF


def ref_to_f32_input(x) -> np.ndarray:
    """Input in float32 with float32-subnormal values flushed to signed zero (documented choice)."""
    x32 = np.asarray(x).astype(np.float32)
    return np.where(np.abs(x32) < np.float32(F32_MIN_NORMAL), np.copysign(np.float32(0), x32), x32)


def ref_mx_scale_byte(amax, elem, scale_mode: str) -> np.ndarray:
    """E8M0 shared-scale byte of a block with max-magnitude `amax` (float32).

    floor (OCP MX v1.0 sec. 6.3): byte = clamp(E(amax) - 127 - emax, -127, 127) + 127.
    rceil (cvt.rp.satfinite.ue8m0): d = f32(amax * f32(1/max)); byte = E(d) + (M(d) != 0), <= 254.
    """
    amax = np.asarray(amax, dtype=np.float32)
    finite = np.isfinite(amax)
    amax_f = np.where(finite, amax, np.float32(0))
    if scale_mode == "floor":
        exp_field, _ = f32_fields(amax_f)
        shared_exp = np.clip(exp_field - 127 - elem_emax(elem), -127, 127)
        byte = shared_exp + 127
    elif scale_mode == "rceil":
        inv_max = np.float32(1.0) / np.float32(elem_max(elem))
        d = (amax_f * inv_max).astype(np.float32)
        exp_field, mant = f32_fields(d)
        byte = np.where(exp_field == 0, (mant > 0x400000).astype(np.int64),
                        np.minimum(exp_field + (mant != 0), 254))
    else:
        raise ValueError(f"unknown scale_mode {scale_mode!r}")
    return np.where(finite, byte, E8M0_NAN_BYTE).astype(np.uint8)


# ----------------------------------------------------------------------------- block layout


def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _to_blocks(x: np.ndarray, axes: tuple[int, ...], block: int) -> np.ndarray:
    """Move block axes last and split each into (n/B, B): shape lead + (n/B, B[, m/B, B])."""
    k = len(axes)
    moved = np.moveaxis(x, axes, list(range(x.ndim - k, x.ndim)))
    lead = moved.shape[: x.ndim - k]
    split = sum(((n // block, block) for n in moved.shape[x.ndim - k:]), ())
    return moved.reshape(lead + split)


def _from_blocks(xb: np.ndarray, axes: tuple[int, ...], ndim: int) -> np.ndarray:
    k = len(axes)
    moved = xb.reshape(xb.shape[: ndim - k] + tuple(
        xb.shape[ndim - k + 2 * i] * xb.shape[ndim - k + 2 * i + 1] for i in range(k)))
    return np.moveaxis(moved, list(range(ndim - k, ndim)), axes)


def _block_reduce_axes(ndim: int, k: int) -> tuple[int, ...]:
    return tuple(ndim - k + 2 * i + 1 for i in range(k))


def _scales_from_blocks(sb: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Per-block array (lead + (n/B[, m/B])) -> x's layout with each block axis divided by B."""
    k = len(axes)
    return np.moveaxis(sb, list(range(sb.ndim - k, sb.ndim)), axes)


def _pad_to_blocks(x: np.ndarray, axes: tuple[int, ...], block: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    for a in axes:
        widths[a] = (0, -x.shape[a] % block)
    return np.pad(x, widths)


# ----------------------------------------------------------------------------- quantizers


@dataclasses.dataclass
class RefQ:
    """Reference quantization: grid values (float64), scales, tensor scale, as the spec defines."""

    data: np.ndarray  # float64 values on the element grid, x's shape
    elem: object  # ml_dtypes element dtype
    kind: str  # "mx" | "nvfp4" | "tensor"
    scale_bits: np.ndarray | None  # uint8 E8M0 bytes (mx) / E4M3 codes (nvfp4); None per-tensor
    scale_values: np.ndarray | None  # float64 value of each block scale (NaN for non-finite blocks)
    tensor_scale: np.float32 | None
    prescale: float = 1.0

    @property
    def data_bits(self) -> np.ndarray:
        return ref_encode(self.data, self.elem)


def _round(y, elem, u):
    return ref_round_to_grid(y, elem) if u is None else ref_stochastic_round(y, elem, u)


def _apply_prescale(y, prescale: float) -> np.ndarray:
    y32 = np.asarray(y, dtype=np.float32)
    return y32 if prescale == 1.0 else (y32 * np.float32(prescale)).astype(np.float32)


def ref_quantize_mx(x, elem, block: int = 32, axis=-1, scale_mode: str = "floor",
                    prescale: float = 1.0, pad: bool = False, u=None) -> RefQ:
    """MX: per block s = E8M0 exponent (floor | rceil); elements RNE/SR(clip(x * 2^-s * prescale)).

    OCP MX v1.0 sec. 5-6; blocks whose amax is not finite get byte 255 and elements 0.
    """
    x32 = ref_to_f32_input(x)
    shape = x32.shape
    axes = _norm_axes(axis, x32.ndim)
    if pad:
        x32 = _pad_to_blocks(x32, axes, block)
        u = None if u is None else _pad_to_blocks(np.asarray(u), axes, block)
    xb = _to_blocks(x32, axes, block)
    red = _block_reduce_axes(x32.ndim, len(axes))
    block_amax = np.max(np.abs(xb), axis=red)
    scale_byte = ref_mx_scale_byte(block_amax, elem, scale_mode)
    byte_e = np.expand_dims(scale_byte, red).astype(np.int64)
    # Exact power-of-two scaling in float64 (x * 2^-s is exact there, no subnormal constant).
    y = xb.astype(np.float64) * np.exp2(-(byte_e - 127).astype(np.float64))
    y = _apply_prescale(_from_blocks(y, axes, x32.ndim), prescale)
    q = _round(np.clip(y, -elem_max(elem), elem_max(elem)), elem, u)
    nan_block = _from_blocks(np.broadcast_to(byte_e == E8M0_NAN_BYTE, xb.shape), axes, x32.ndim)
    q = np.where(nan_block, 0.0, q)
    scale_bits = _scales_from_blocks(scale_byte, axes)
    scale_values = np.where(scale_bits == E8M0_NAN_BYTE, np.nan,
                            np.exp2(scale_bits.astype(np.float64) - 127))
    q = q[tuple(slice(0, n) for n in shape)]
    return RefQ(q, elem, "mx", scale_bits, scale_values, None, prescale)


def ref_nvfp4_tensor_scale(x32: np.ndarray) -> np.float32:
    """max(f32(amax over finite elements / 2688), 2^-120) (NVFP4 per-tensor encode scale)."""
    finite_abs = np.abs(x32[np.isfinite(x32)])
    tensor_amax = np.float32(finite_abs.max()) if finite_abs.size else np.float32(0)
    return np.maximum(np.float32(tensor_amax / np.float32(NVFP4_TENSOR_DIVISOR)),
                      np.float32(NVFP4_TENSOR_SCALE_FLOOR))


def ref_quantize_nvfp4(x, axis=-1, prescale: float = 1.0, pad: bool = False, u=None) -> RefQ:
    """NVFP4: ts = max(amax/2688, 2^-120); block s = e4m3(clamp(f32(f32(bamax/6)/ts), 2^-6, 448));
    elements = RNE/SR(clip(f32(x * f32(f32(1 / ts) / s)) * prescale, +-6)) in E2M1 (torchao, as
    DESIGN.md quotes it: one reciprocal per block, then a multiply).
    """
    elem, block = ml_dtypes.float4_e2m1fn, 16
    x32 = ref_to_f32_input(x)
    shape = x32.shape
    axes = _norm_axes(axis, x32.ndim)
    tensor_scale = ref_nvfp4_tensor_scale(x32)
    if pad:
        x32 = _pad_to_blocks(x32, axes, block)
        u = None if u is None else _pad_to_blocks(np.asarray(u), axes, block)
    xb = _to_blocks(x32, axes, block)
    red = _block_reduce_axes(x32.ndim, len(axes))
    block_amax = np.max(np.abs(xb), axis=red).astype(np.float32)
    finite = np.isfinite(block_amax)
    b = ((np.where(finite, block_amax, 0) / np.float32(6.0)).astype(np.float32) / tensor_scale)
    b = np.clip(b.astype(np.float32), np.float32(2.0**-6), np.float32(448.0))
    scale = np.where(finite, ref_round_to_grid(b, ml_dtypes.float8_e4m3fn), np.nan)
    denom = np.expand_dims(scale, red).astype(np.float32)
    with np.errstate(invalid="ignore"):
        recip = (np.float32(np.float32(1.0) / tensor_scale) / denom).astype(np.float32)
        y = (xb * recip).astype(np.float32)
    y = _apply_prescale(_from_blocks(y, axes, x32.ndim), prescale)
    nan_block = _from_blocks(np.broadcast_to(np.isnan(denom), xb.shape), axes, x32.ndim)
    y = np.where(nan_block, 0.0, y)
    q = _round(np.clip(y, -6.0, 6.0), elem, u)
    q = np.where(nan_block, 0.0, q)
    scale_values = _scales_from_blocks(scale, axes)
    scale_bits = np.where(np.isnan(scale_values), 0x7F,
                          ref_encode(np.nan_to_num(scale_values), ml_dtypes.float8_e4m3fn))
    q = q[tuple(slice(0, n) for n in shape)]
    return RefQ(q, elem, "nvfp4", scale_bits.astype(np.uint8), scale_values, tensor_scale, prescale)


def ref_quantize_fp8(x, elem, prescale: float = 1.0, u=None) -> RefQ:
    """Per-tensor FP8: ts = f32(amax / max) (1 if amax == 0, NaN if not finite);
    (ts floored at 2^-126 for tiny amax); elements = RNE/SR(clip(f32(x * f32(1 / ts)) * prescale, +-max));
    a non-finite tensor stores zeros.
    """
    x32 = ref_to_f32_input(x)
    amax = np.float32(np.max(np.abs(x32))) if x32.size else np.float32(0)
    if not np.isfinite(amax):
        tensor_scale = np.float32(np.nan)
    elif amax == 0:
        tensor_scale = np.float32(1.0)
    else:
        tensor_scale = np.maximum(np.float32(amax / np.float32(elem_max(elem))),
                                  np.float32(2.0**-126))
    if np.isnan(tensor_scale):
        return RefQ(np.zeros(x32.shape), elem, "tensor", None, None, tensor_scale, prescale)
    y = _apply_prescale((x32 * np.float32(np.float32(1.0) / tensor_scale)).astype(np.float32), prescale)
    q = _round(np.clip(y, -elem_max(elem), elem_max(elem)), elem, u)
    return RefQ(q, elem, "tensor", None, None, tensor_scale, prescale)


def ref_quantize(x, name: str, axis=-1, scale_mode: str = "floor", prescale: float = 1.0,
                 pad: bool = False, u=None) -> RefQ:
    """Dispatch on a format name of REF_FORMATS (scale_mode applies to MX formats only)."""
    kind, elem, block = REF_FORMATS[name.lower()]
    if kind == "mx":
        return ref_quantize_mx(x, elem, block, axis, scale_mode, prescale, pad, u)
    if kind == "nvfp4":
        return ref_quantize_nvfp4(x, axis, prescale, pad, u)
    return ref_quantize_fp8(x, elem, prescale, u)


def ref_dequantize(rq: RefQ, axis=-1, dtype=np.float32) -> np.ndarray:
    """MX: f32(data) * 2^s / prescale; NVFP4: f32(data) * f32(ts * f32(s)) / prescale;
    FP8: f32(data) * ts / prescale; then cast to `dtype`. NaN scales give NaN.
    """
    data32 = rq.data.astype(np.float32)
    if rq.kind == "tensor":
        out = (data32 * rq.tensor_scale).astype(np.float32)
    else:
        axes = _norm_axes(axis, data32.ndim)
        block = 32 if rq.kind == "mx" else 16
        scale = rq.scale_values
        for a in axes:  # broadcast each block scale over its elements, cut to the data's shape
            scale = np.repeat(scale, block, axis=a)
        scale = scale[tuple(slice(0, n) for n in data32.shape)]
        if rq.kind == "mx":
            out = (rq.data * scale).astype(np.float32)  # exact product in float64, then to f32
        else:
            denom = (rq.tensor_scale * scale.astype(np.float32)).astype(np.float32)
            out = (data32 * denom).astype(np.float32)
    if rq.prescale != 1.0:
        out = (out / np.float32(rq.prescale)).astype(np.float32)
    return out.astype(dtype)


def ref_ragged_dot(lhs, rhs_ekn, sizes) -> np.ndarray:
    """float64 lax.ragged_dot: rows of group e (in order) times rhs[e]; rows past sum(sizes) are 0."""
    lhs64, rhs64 = np.asarray(lhs, np.float64), np.asarray(rhs_ekn, np.float64)
    out = np.zeros((lhs64.shape[0], rhs64.shape[2]))
    start = 0
    for e, size in enumerate(sizes):
        out[start:start + size] = lhs64[start:start + size] @ rhs64[e]
        start += size
    return out


def fp8_midpoints(elem) -> np.ndarray:
    """float32 [rows, 128]: every midpoint between adjacent non-negative values of FP8 `elem`, one float32
    ulp either side, the grid itself, their negatives, and the element maximum (so a per-tensor scale
    amax / max is 1). One ulp off a tie tells RNE from double rounding through a 16-bit float."""
    top = elem_max(elem)
    grid = np.arange(256, dtype=np.uint8).view(elem).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid) & (grid >= 0) & (grid <= top)])
    mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    below, above = np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))
    vals = np.concatenate([mid, below, above, grid])
    vals = np.concatenate([vals, -vals, [top]]).astype(np.float32)
    return np.resize(vals, (-(-vals.size // 128), 128))
