"""Per-tensor FP8 GEMM for Hopper: float8 operands straight into lax.dot_general.

y = (q_a · q_bᵀ in FP8 tensor cores, bf16 out) · (t_a t_b / (p_a p_b)). XLA rewrites a float8
dot_general with a bf16 result into cuBLASLt FP8 (`__cublas$lt$matmul$f8`) and folds the scalar
output scale into it (DESIGN "Execution"); operands are never dequantized on this path. Both
operands arrive with the contracting dim last ("TN"), the layout cuBLASLt FP8 needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.backends.emulate import TN_DIMS
from lowbit.quantize import QArray


def _check(op: Any, side: str) -> QArray:
    if not isinstance(op, QArray) or op.fmt.kind != "tensor":
        got = op.fmt.name if isinstance(op, QArray) else f"unquantized {op.dtype}"
        raise ValueError(
            f"the fp8 backend multiplies per-tensor FP8 operands only; {side} is {got}. "
            "Use backend 'emulate' (or 'native' on compute capability >= 10) for block-scaled formats"
        )
    return op


def gemm(lhs: Any, rhs: Any, *, out_dtype: Any, compute_dtype: Any = jnp.bfloat16,
         precision: Any = None) -> jax.Array:
    """FP8 lhs [B, M, K] x FP8 rhs [B, N, K] -> [B, M, N] with the scalar scales on the output."""
    del compute_dtype  # the tensor cores consume the FP8 data directly
    a, b = _check(lhs, "lhs"), _check(rhs, "rhs")
    # bf16/f16 results let XLA fuse the scale into the GEMM epilogue; f32 costs a convert pass.
    acc_dtype = out_dtype if jnp.dtype(out_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) \
        else jnp.float32
    y = lax.dot_general(a.data, b.data, TN_DIMS, precision=precision, preferred_element_type=acc_dtype)
    scale = a.tensor_scale * b.tensor_scale / (a.prescale * b.prescale)
    return (y * scale.astype(acc_dtype)).astype(out_dtype)
