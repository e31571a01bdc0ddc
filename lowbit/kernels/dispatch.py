"""Which implementation quantizes the operands of lowbit's GEMMs: the XLA reference or the fused kernel.

One process-wide switch, `set_quantize_impl("auto" | "xla" | "fused")`, default from the environment
variable LOWBIT_QUANTIZE_IMPL (else "auto"). Both implementations give the same bits (the fused
kernel is held to lowbit.quantize bit for bit), so the switch only changes speed, never numerics:

- "xla": always lowbit.quantize (XLA ops).
- "auto": the fused Pallas/Triton kernel (lowbit.kernels.quantize_pallas) on a single-GPU process,
  round-to-nearest and stochastic rounding alike (both draw SR's u from lowbit.quantize.sr_hash of
  the element's flat index); lowbit.quantize everywhere else. More than one device stays on XLA: a
  pallas_call has no SPMD partitioning rule, so under jit with sharded operands XLA replicates
  it and gathers its operands onto every device (use "fused" under shard_map, where each device
  sees its own shard).
- "fused": the kernel wherever it can take the call (on the CPU in Pallas interpret mode, slow: for
  tests).

Either way the kernel is skipped, silently and with identical results, where it cannot take the
call: per-tensor FP8 and FP6 formats, a blocked axis that is not a multiple of the block size
(pad needed), blocks along an axis other than the last (or 2-D tiles not on the last two axes, or
tiles that would straddle a leading batch index), non-float or empty arrays, and stochastic
rounding without a key (lowbit.quantize then raises the error that names the fix).

Per-tensor FP8 has its own kernel (lowbit.kernels.fp8_cast_pallas: the cast and a transposed copy
in one pass, TE's cast_transpose), taken by `quantize_with_transpose` under the same switch, for
round-to-nearest on [..., M, N] arrays whose tiles are at least 16x16 (smaller ones stay on XLA).

Entry points: `quantize` (a drop-in for lowbit.quantize), `quantize_with_transpose` (that QArray
and its swapaxes(-1, -2) twin), `use_fused` (the decision alone) and `quantize_fused_nd` (the kernel
on [..., rows, K] arrays); lowbit.dot calls `quantize` and `quantize_with_transpose`.

The switch is read when a function is traced: a function already compiled by jax.jit keeps the
implementation it was traced with (jit a fresh function, or clear its cache, after switching).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from lowbit.formats import Format, get_format
from lowbit.kernels.quantize_pallas import (
    _triton_available,
    fused_available,
    matrix_axes,
    normalized_axes,
    quantize_fused,
)
from lowbit.quantize import BlockValues, QArray
from lowbit.quantize import quantize as quantize_xla

QUANTIZE_IMPLS = ("auto", "xla", "fused")
ENV_VAR = "LOWBIT_QUANTIZE_IMPL"
# "0": quantize(values_dtype=...) and block_values return QArrays even where a kernel could write block values
# (for benchmarks)
VALUES_ENV_VAR = "LOWBIT_QUANTIZE_VALUES"

_impl: str | None = None  # set_quantize_impl's choice; None: the environment variable's (or "auto")


def _checked(impl: str, source: str) -> str:
    if impl not in QUANTIZE_IMPLS:
        raise ValueError(f"unknown quantize implementation {impl!r} ({source}); choose one of "
                         f"{QUANTIZE_IMPLS}")
    return impl


def set_quantize_impl(impl: str | None) -> None:
    """Choose how lowbit's GEMMs quantize their operands: "auto", "xla" or "fused" (None: back to the
    default, $LOWBIT_QUANTIZE_IMPL or "auto"). Same bits either way; see this module's docstring."""
    global _impl
    _impl = None if impl is None else _checked(impl, "set_quantize_impl")


def get_quantize_impl() -> str:
    """The implementation in force: set_quantize_impl's choice, else $LOWBIT_QUANTIZE_IMPL, else "auto"."""
    if _impl is not None:
        return _impl
    return _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def quantize_impl(impl: str | None) -> Iterator[None]:
    """Context manager: set_quantize_impl(impl) inside the block, the previous choice restored after."""
    previous = _impl
    set_quantize_impl(impl)
    try:
        yield
    finally:
        set_quantize_impl(previous)


# ----------------------------------------------------------------------------- routing
def _single_device() -> bool:
    """One device in the process: no SPMD partitioning that a pallas_call would defeat."""
    return jax.device_count() == 1


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _kernel_axes(x: jax.Array, fmt: Format, axis: int | Sequence[int], rounding: str,
                 key: jax.Array | None, scale_mode: str, require_gpu: bool) -> tuple[int, ...] | None:
    """Axes for quantize_fused on x's matrix view, or None where the kernel cannot take the call."""
    if fmt.kind not in ("mx", "nvfp4") or x.ndim == 0 or x.size == 0:
        return None
    if rounding == "stochastic" and key is None:
        return None  # lowbit.quantize raises the error that names the fix
    axes = normalized_axes(axis, x.ndim)
    kernel_axes = None if axes is None else matrix_axes(tuple(x.shape), axes, fmt.block_size)
    if kernel_axes is None:
        return None
    matrix = jax.ShapeDtypeStruct((math.prod(x.shape[:-1]), x.shape[-1]), x.dtype)
    # pad=False: a blocked axis that divides by the block size needs no padding (pad=True gives the
    # same result); one that does not is declined here and padded by the XLA path.
    ok = fused_available(matrix, fmt, kernel_axes, scale_mode=scale_mode, rounding=rounding,
                         pad=False, require_gpu=require_gpu)
    return kernel_axes if ok else None


def _impl_allows_kernel() -> tuple[bool, bool]:
    """(a kernel may run, it must be on a GPU) under the implementation in force."""
    impl = get_quantize_impl()
    if impl == "xla" or (impl == "auto" and not _single_device()):
        return False, True
    return True, impl == "auto"


def use_fused(
    x: jax.Array,
    fmt: Format | str,
    axis: int | Sequence[int] = -1,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    scale_mode: str = "floor",
) -> bool:
    """Whether the implementation in force (get_quantize_impl) quantizes this call with the fused kernel."""
    allowed, require_gpu = _impl_allows_kernel()
    if not allowed:
        return False
    return _kernel_axes(jnp.asarray(x), get_format(fmt), axis, rounding, key, scale_mode,
                        require_gpu=require_gpu) is not None


def quantize_fused_nd(
    x: jax.Array,
    fmt: Format | str,
    axis: int | Sequence[int] = -1,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    scale_mode: str = "floor",
    *,
    prescale: float = 1.0,
    values_dtype: object = None,
) -> QArray | BlockValues:
    """lowbit.quantize(x, ...) by the fused kernel for any rank: x [..., rows, K] runs as the matrix
    [prod(...) * rows, K]; data and scales are reshaped back and `axis` set as lowbit.quantize sets it.
    With values_dtype: BlockValues of x's shape instead (see quantize).

    NVFP4's tensor scale is the amax of all of x, as lowbit.quantize takes it. Stochastic rounding
    hashes the element's flat index in the matrix, which is its flat index in x: the same u.
    """
    fmt, x = get_format(fmt), jnp.asarray(x)
    kernel_axes = _kernel_axes(x, fmt, axis, rounding, key, scale_mode, require_gpu=False)
    if kernel_axes is None:
        raise ValueError(
            f"the fused kernel does not take {fmt.name} on a {x.dtype} array of shape {x.shape} with "
            f"axis={axis!r} (it needs MX FP8/FP4 or NVFP4, blocks along the last axis or tiles over the "
            "last two that divide the shape); use lowbit.kernels.dispatch.quantize, which falls back "
            "to lowbit.quantize"
        )
    q = quantize_fused(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), fmt, scale_mode=scale_mode,
                       rounding=rounding, key=key, axis=kernel_axes, prescale=prescale,
                       values_dtype=values_dtype)
    if isinstance(q, BlockValues):
        return BlockValues(q.values.reshape(x.shape), q.tensor_scale, fmt, normalized_axes(axis, x.ndim),
                           q.prescale)
    block = fmt.block_size
    if kernel_axes == (0, 1):
        scale_shape = (*x.shape[:-2], x.shape[-2] // block, x.shape[-1] // block)
    else:
        scale_shape = (*x.shape[:-1], x.shape[-1] // block)
    return QArray(q.data.reshape(x.shape), q.scale.reshape(scale_shape), q.tensor_scale, fmt,
                  normalized_axes(axis, x.ndim), q.prescale)


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
    values_dtype: object = None,
) -> QArray | BlockValues:
    """lowbit.quantize(x, ...) by the implementation get_quantize_impl() selects for this call: the
    same QArray (bits, shapes, dtypes, axis, tensor_scale, prescale) whichever runs.

    values_dtype (an emulated GEMM's operand): where the kernel takes the call, BlockValues (data · block
    scale in that dtype) from one pass that reads x once and writes only the values, no codes or scales to
    store and read back; elsewhere, or with $LOWBIT_QUANTIZE_VALUES=0, the QArray.
    lowbit.backends.emulate.split_scales gives the same values and outer scale from either."""
    if use_fused(x, fmt, axis, rounding, key, scale_mode):
        values_dtype = values_dtype if _values_enabled() else None
        return quantize_fused_nd(x, fmt, axis, rounding, key, scale_mode, prescale=prescale,
                                 values_dtype=values_dtype)
    return quantize_xla(x, fmt, axis=axis, rounding=rounding, key=key, scale_mode=scale_mode, pad=pad,
                        prescale=prescale)


def _values_enabled() -> bool:
    value = os.environ.get(VALUES_ENV_VAR, "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"${VALUES_ENV_VAR}={value!r}: set it to 1 (block values, the default) or 0 (codes)")
    return value != "0"


def block_values(q: QArray | BlockValues | jax.Array, dtype: object = jnp.bfloat16
                 ) -> QArray | BlockValues | jax.Array:
    """An emulated GEMM's operand from a stored QArray (a residual): BlockValues from the dequantize kernel
    (lowbit.kernels.dequantize_pallas) where the implementation in force runs kernels, as for quantize,
    and the kernel takes q; anything else comes back unchanged (split_scales dequantizes a QArray the
    same)."""
    from lowbit.kernels.dequantize_pallas import block_values_available, block_values_fused

    if not isinstance(q, QArray) or not _values_enabled():
        return q
    allowed, require_gpu = _impl_allows_kernel()
    if not allowed or (require_gpu and not (_on_gpu() and _triton_available())):
        return q
    return block_values_fused(q, dtype) if block_values_available(q) else q


_FP8_CAST_MIN_TILE = 16  # below this, tiles are too thin for the kernel to beat XLA's cast
_CAST_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def use_fp8_cast(x: jax.Array, fmt: Format | str, rounding: str = "nearest") -> bool:
    """Whether quantize_with_transpose takes this call with the per-tensor FP8 cast(+transpose) kernel."""
    from lowbit.kernels.fp8_cast_pallas import FP8_FORMATS, tiles

    allowed, require_gpu = _impl_allows_kernel()
    fmt = get_format(fmt)
    if not allowed or fmt.name not in FP8_FORMATS or rounding != "nearest":
        return False
    if x.ndim < 2 or x.size == 0 or jnp.dtype(x.dtype) not in _CAST_DTYPES:
        return False
    if (require_gpu and not _on_gpu()) or (_on_gpu() and not _triton_available()):
        return False
    return min(tiles(tuple(x.shape))) >= _FP8_CAST_MIN_TILE


def quantize_with_transpose(
    x: jax.Array,
    fmt: Format | str,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    *,
    prescale: float = 1.0,
) -> tuple[QArray, QArray]:
    """(q, q_t): lowbit.quantize(x, fmt) of a per-tensor format on x [..., M, N] and the same QArray
    with data swapaxes(-1, -2), from the FP8 cast(+transpose) kernel where use_fp8_cast says so (x read
    once, both layouts written), else lowbit.quantize and an XLA transpose. Same bits either way."""
    fmt, x = get_format(fmt), jnp.asarray(x)
    if fmt.kind != "tensor":
        raise ValueError(f"quantize_with_transpose is for per-tensor formats (one scale, so a transposed "
                         f"copy is the same QArray), got {fmt.name!r}; quantize each layout with quantize")
    if use_fp8_cast(x, fmt, rounding):
        from lowbit.kernels.fp8_cast_pallas import fp8_cast

        return fp8_cast(x, fmt.name, transpose=True, prescale=prescale)  # Pallas interpret mode off a GPU
    q = quantize_xla(x, fmt, rounding=rounding, key=key, prescale=prescale)
    return q, dataclasses.replace(q, data=jnp.swapaxes(q.data, -1, -2))


def quantize_scaled_with_transpose(
    x: jax.Array,
    fmt: Format | str,
    tensor_scale: jax.Array,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    *,
    prescale: float = 1.0,
    transpose: bool = True,
) -> tuple[QArray, QArray | None, jax.Array]:
    """(q, q_t or None, amax): lowbit.scaling.quantize_scaled with a given (delayed) tensor scale, from
    the FP8 cast kernel where use_fp8_cast says so (x read once, no reduction before it), else XLA."""
    from lowbit.scaling import quantize_scaled

    fmt, x = get_format(fmt), jnp.asarray(x)
    if use_fp8_cast(x, fmt, rounding):
        from lowbit.kernels.fp8_cast_pallas import fp8_cast_scaled

        return fp8_cast_scaled(x, fmt.name, tensor_scale, transpose=transpose, prescale=prescale)
    q, amax = quantize_scaled(x, fmt, tensor_scale, rounding, key, prescale=prescale)
    q_t = dataclasses.replace(q, data=jnp.swapaxes(q.data, -1, -2)) if transpose else None
    return q, q_t, amax


__all__ = ["ENV_VAR", "QUANTIZE_IMPLS", "VALUES_ENV_VAR", "get_quantize_impl", "quantize",
           "quantize_fused_nd", "quantize_impl", "quantize_scaled_with_transpose",
           "quantize_with_transpose", "set_quantize_impl", "use_fp8_cast", "use_fused", "block_values"]
