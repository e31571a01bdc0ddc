"""A QArray's block values, data · scale per block, in one Pallas (Triton) pass: an emulated GEMM's operand.

Reads the codes (FP8 bytes, or E2M1 two per byte) and the 8-bit block scales once and writes the values in a
compute dtype, bit for bit what lowbit.backends.emulate.split_scales computes from the QArray (the tensor
scale and prescale are left for the GEMM's float32 accumulator). The quantized residuals of lowbit's GEMMs go
through it in the backward pass, so that the backward GEMMs multiply plain bf16 operands.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.kernels.quantize_pallas import (
    _E4M3_NAN,
    _E8M0_NAN,
    _block_values,
    _pallas_available,
    _Plan,
    _resolve_tile,
    _tiling,
    _triton_available,
    checked_values_dtype,
    matrix_axes,
    normalized_axes,
)
from lowbit.quantize import BlockValues, QArray

_SCALE_NAN = {"mx": _E8M0_NAN, "nvfp4": _E4M3_NAN}  # E4M3's NaN is matched without its sign bit


def _kernel_axes(q: QArray) -> tuple[int, ...] | None:
    """(1,) for blocks along the last axis, (0, 1) for tiles over the last two, on q's matrix view; else
    None."""
    fmt = q.fmt
    if fmt.kind not in _SCALE_NAN or fmt.storage_dtype != fmt.elem_dtype or q.scale is None:
        return None
    shape, block = tuple(q.data.shape), fmt.block_size
    if q.data.ndim < 1 or math.prod(shape) == 0 or shape[-1] % block:
        return None
    axes = normalized_axes(q.axis, q.data.ndim)
    return None if axes is None else matrix_axes(shape, axes, block)


def block_values_available(q: QArray) -> bool:
    """Whether block_values_fused takes q: MX FP8/FP4 or NVFP4 data blocked along its last axis (or tiled over
    the last two), whole blocks, non-empty, Pallas importable."""
    return _pallas_available() and isinstance(q, QArray) and _kernel_axes(q) is not None


def _kernel(data_ref, scale_ref, out_ref, *, plan: _Plan, fp4: bool):
    codes = data_ref[...].astype(jnp.int32)
    if fp4:  # byte j holds elements 2j (low nibble) and 2j+1: broadcast its trailing size-1 axis to 2
        shift = lax.broadcasted_iota(jnp.int32, out_ref.shape, len(out_ref.shape) - 1) * 4
        codes = (codes >> shift) & 0xF
    scale_code = scale_ref[...].astype(jnp.int32)
    poisoned = (scale_code & _SCALE_NAN[plan.kind]) == _SCALE_NAN[plan.kind]
    out_ref[...] = _block_values(codes, scale_code, poisoned, plan).astype(out_ref.dtype)


def block_values_fused(q: QArray, dtype: Any = jnp.bfloat16, interpret: bool | None = None, *,
                       block_rows: int | None = None, block_cols: int | None = None,
                       num_warps: int | None = None) -> BlockValues:
    """BlockValues(data · scale per block in `dtype`, q.tensor_scale, q.fmt, q.axis, q.prescale), one kernel.

    q [..., rows, K] runs as the matrix [prod(...)·rows, K]. interpret=None: compiled on a GPU, Pallas
    interpret mode elsewhere. Tiles default to the quantize kernel's (quantize_pallas.DEFAULT_TILES)."""
    kernel_axes = _kernel_axes(q) if isinstance(q, QArray) else None
    if kernel_axes is None:
        raise ValueError("block_values_fused takes MX FP8/FP4 or NVFP4 QArrays blocked along the last axis "
                         "(or tiled over the last two) in whole blocks; use q.dequantize() or "
                         "lowbit.backends.emulate.split_scales for others")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    values = _block_values_jit(q.data, q.scale, q.fmt, kernel_axes, checked_values_dtype(dtype),
                               bool(interpret), *_resolve_tile(q.fmt, block_rows, block_cols, num_warps))
    return BlockValues(values, q.tensor_scale, q.fmt, q.axis, q.prescale)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _block_values_jit(data, scale, fmt, axes, dtype, interpret, block_rows, block_cols, num_warps):
    from jax.experimental import pallas as pl

    shape = data.shape
    m, n = math.prod(shape[:-1]), shape[-1]
    b = fmt.block_size
    r = b if axes == (0, 1) else 1
    fp4 = fmt.elem_bits == 4
    plan = _Plan(kind=fmt.kind, block=b, tile_rows=r, emin=fmt.emin, emax=fmt.emax, mbits=fmt.mbits,
                 elem_bits=fmt.elem_bits, elem_max=fmt.elem_max, scale_mode="floor", rounding="nearest",
                 div="int", encode="integer", scale_encode="unused", packed=False, words=False, prescale=1.0)
    if fp4:  # float4 [m, n] -> its bytes [m, n/2], element 2j in the low nibble of byte j
        codes = lax.bitcast_convert_type(data.reshape(m, n // 2, 2), jnp.uint8)
        in_view, out_view = (m // r, r, n // b, b // 2, 1), (m // r, r, n // b, b // 2, 2)
    else:
        codes = lax.bitcast_convert_type(data.reshape(m, n), jnp.uint8)
        in_view = out_view = (m // r, r, n // b, b)
    scale_view = (m // r, 1, n // b, 1) + ((1,) if fp4 else ())
    scale_codes = lax.bitcast_convert_type(scale.reshape(m // r, n // b), jnp.uint8).reshape(scale_view)

    rows_per_tile, blocks_per_tile, grid, index_of = _tiling(in_view, r, b, block_rows, block_cols)
    index = functools.partial(index_of, rank=len(in_view))

    def tile(view):
        return (rows_per_tile, view[1], blocks_per_tile, *view[3:])

    compiler_params = None
    if not interpret and _triton_available():
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=num_warps)
    values = pl.pallas_call(
        functools.partial(_kernel, plan=plan, fp4=fp4),
        out_shape=jax.ShapeDtypeStruct(out_view, jnp.dtype(dtype)),
        grid=grid,
        in_specs=[pl.BlockSpec(tile(in_view), index), pl.BlockSpec(tile(scale_view), index)],
        out_specs=pl.BlockSpec(tile(out_view), index),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"lowbit_block_values_{fmt.name}",
    )(codes.reshape(in_view), scale_codes)
    return values.reshape(shape)
