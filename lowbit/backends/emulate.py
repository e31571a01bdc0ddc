"""Emulated quantized GEMM: dequantize block-scaled operands, then an XLA dot (runs anywhere).

y = (Σ_k (q_a·s_a)[m,k] (q_b·s_b)[n,k]) · t_a t_b / (p_a p_b): block scales s are applied to the
operands (exact in bfloat16: ≤ 6 significant bits), per-tensor scales t and prescales p to the
float32 accumulator, as block-scaled tensor cores do (OCP MX v1.0 sec. 6.4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.quantize import BlockValues, QArray

# Canonical "TN" GEMM: lhs [B, M, K] x rhs [B, N, K] -> [B, M, N], contracting the last axes.
TN_DIMS = (((2,), (2,)), ((0,), (0,)))

Operand = QArray | BlockValues | jax.Array


def split_scales(op: Operand, compute_dtype: Any) -> tuple[jax.Array, jax.Array | float]:
    """(values, outer): values = data · block scale in compute_dtype, outer = tensor_scale / prescale.
    BlockValues (the quantize kernel's values output) already hold the values."""
    if isinstance(op, BlockValues):
        outer = 1.0 / op.prescale
        return op.values.astype(compute_dtype), outer if op.tensor_scale is None else op.tensor_scale * outer
    if not isinstance(op, QArray):
        return op, 1.0
    inner = dataclasses.replace(
        op, prescale=1.0, tensor_scale=None if op.tensor_scale is None else jnp.ones((), jnp.float32)
    )
    values = inner.dequantize(jnp.float32).astype(compute_dtype)
    outer = 1.0 / op.prescale
    if op.tensor_scale is not None:
        outer = op.tensor_scale * outer
    return values, outer


def gemm(lhs: Operand, rhs: Operand, *, out_dtype: Any, compute_dtype: Any = jnp.bfloat16,
         precision: Any = None) -> jax.Array:
    """lhs [B, M, K] x rhs [B, N, K] -> [B, M, N]; QArrays are dequantized along their blocks."""
    a, outer_a = split_scales(lhs, compute_dtype)
    b, outer_b = split_scales(rhs, compute_dtype)
    common = jnp.promote_types(a.dtype, b.dtype)
    y = lax.dot_general(a.astype(common), b.astype(common), TN_DIMS, precision=precision,
                        preferred_element_type=jnp.float32)
    if not (isinstance(outer_a, float) and isinstance(outer_b, float) and outer_a * outer_b == 1.0):
        y = y * (outer_a * outer_b)
    return y.astype(out_dtype)
