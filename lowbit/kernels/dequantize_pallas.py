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
    DEFAULT_TILES,
    _block_values,
    _Plan,
    _pow2_divisor,
    _triton_available,
    checked_values_dtype,
    normalized_axes,
)
from lowbit.quantize import BlockValues, QArray

_SCALE_NAN = {"mx": 0xFF, "nvfp4": 0x7F}  # E8M0 NaN; E4M3 NaN without its sign bit


def _kernel_axes(q: QArray) -> tuple[int, ...] | None:
    """(1,) for blocks along the last axis, (0, 1) for tiles over the last two, on q's matrix view; else
    None."""
    fmt = q.fmt
    if fmt.kind not in _SCALE_NAN or fmt.storage_dtype != fmt.elem_dtype or q.scale is None:
        return None
    shape, ndim, block = tuple(q.data.shape), q.data.ndim, fmt.block_size
    if ndim < 1 or math.prod(shape) == 0 or shape[-1] % block:
        return None
    axes = normalized_axes(q.axis, ndim)
    if axes == (ndim - 1,):
        return (1,)
    if ndim >= 2 and axes == (ndim - 2, ndim - 1) and shape[-2] % block == 0:
        return (0, 1)
    return None


def block_values_available(q: QArray) -> bool:
    """Whether block_values_fused takes q: MX FP8/FP4 or NVFP4 data blocked along its last axis (or tiled over
    the last two), whole blocks, non-empty, Pallas importable."""
    try:
        from jax.experimental import pallas  # noqa: F401
    except ImportError:
        return False
    return isinstance(q, QArray) and _kernel_axes(q) is not None


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
    interpret mode elsewhere. Tiles default to the quantize kernel's (DEFAULT_TILES)."""
    kernel_axes = _kernel_axes(q) if isinstance(q, QArray) else None
    if kernel_axes is None:
        raise ValueError("block_values_fused takes MX FP8/FP4 or NVFP4 QArrays blocked along the last axis "
                         "(or "
                         "tiled over the last two) in whole blocks; use q.dequantize() or "
                         "lowbit.backends.emulate.split_scales for others")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    fmt = q.fmt
    rows, cols, warps = DEFAULT_TILES[fmt.elem_bits]
    tile_cfg = (rows if block_rows is None else block_rows, cols if block_cols is None else block_cols,
                warps if num_warps is None else num_warps)
    values = _block_values_jit(q.data, q.scale, fmt, kernel_axes, checked_values_dtype(dtype),
                               bool(interpret), *tile_cfg)
    return BlockValues(values, q.tensor_scale, fmt, q.axis, q.prescale)


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

    rows_per_tile = _pow2_divisor(m // r, max(1, block_rows // r))
    blocks_per_tile = _pow2_divisor(n // b, max(1, block_cols // b))
    tiles_per_row = (n // b) // blocks_per_tile
    grid = ((m // r // rows_per_tile) * tiles_per_row,)

    def index(p):  # 1-D grid, row-major over tiles
        return (p // tiles_per_row, 0, p % tiles_per_row) + (0,) * (len(in_view) - 3)

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
