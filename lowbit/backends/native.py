"""Block-scaled GEMM on Blackwell (compute capability >= 10) via jax.nn.scaled_matmul -> cuDNN.

y[b,m,n] = Σ_k (q_a s_a)[b,m,k] (q_b s_b)[b,n,k] · t_a t_b / (p_a p_b), with scaled_matmul's contract:
data (B, M, K) / (B, N, K), scales (B, M, K/bs) / (B, N, K/bs), contracting dim last
(jax/_src/nn/functions.py scaled_matmul). MXFP8: e4m3/e5m2 data, e8m0 scales, bs 32; NVFP4: e2m1
data, e4m3 scales, bs 16 (the FP32 tensor scales are applied to the output here).
MXFP4 (e2m1 data, e8m0 scales, bs 32) is not here: XLA's block-scaled-dot matcher takes MXFP8 and
NVFP4 only, and compiled for sm_100 an MXFP4 scaled_matmul became a dequantizing Triton GEMM, not
the cuDNN FP4 GEMM (tools/blackwell_aot.py, docs/benchmarks.md "Blackwell").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowbit.quantize import QArray

NATIVE_FORMATS = ("mxfp8", "mxfp8_e5m2", "nvfp4")
# Why a format is refused, for the error message.
NOT_NATIVE = {"mxfp4": "XLA lowers MXFP4 (E2M1 with E8M0 scales) to a dequantizing GEMM, not cuDNN's "
                       "block-scaled FP4 GEMM; use nvfp4 for FP4 tensor cores"}


def _check(op: Any, side: str) -> QArray:
    if not isinstance(op, QArray) or op.fmt.name not in NATIVE_FORMATS:
        got = op.fmt.name if isinstance(op, QArray) else f"unquantized {op.dtype}"
        why = f" ({NOT_NATIVE[got]})" if got in NOT_NATIVE else ""
        raise ValueError(
            f"the native backend needs block-scaled operands in one of {NATIVE_FORMATS}; "
            f"{side} is {got}{why}. Use backend 'emulate' for other formats"
        )
    return op


def row_scales(q: QArray) -> jax.Array:
    """Scales as scaled_matmul wants them, (B, rows, K/bs): 2-D tiles are repeated along the rows."""
    if q.axis == (2,):
        return q.scale
    if q.axis == (1, 2):
        return jnp.repeat(q.scale, q.fmt.block_size, axis=1)[:, : q.shape[1]]
    raise ValueError(f"native GEMM operands must be blocked along their last axis, got axis {q.axis}")


def gemm(lhs: Any, rhs: Any, *, out_dtype: Any, compute_dtype: Any = jnp.bfloat16,
         precision: Any = None) -> jax.Array:
    """Block-scaled lhs [B, M, K] x rhs [B, N, K] -> [B, M, N] through jax.nn.scaled_matmul."""
    del compute_dtype, precision  # cuDNN fixes both
    a, b = _check(lhs, "lhs"), _check(rhs, "rhs")
    y = jax.nn.scaled_matmul(a.data, b.data, row_scales(a), row_scales(b),
                             preferred_element_type=jnp.float32)
    outer = 1.0 / (a.prescale * b.prescale)
    if a.tensor_scale is not None:
        outer = outer * a.tensor_scale
    if b.tensor_scale is not None:
        outer = outer * b.tensor_scale
    return (y * outer).astype(out_dtype)
