"""Quantized GEMMs with a custom VJP: fprop, dgrad and wgrad each quantized as the recipe says.

A linear layer is three GEMMs (DESIGN "Numerics"): fprop Y = X·W (contract features), dgrad
dX = dY·Wᵀ (contract out-features), wgrad dW = Xᵀ·dY (contract tokens). Every operand is
quantized in blocks along the contraction axis of the GEMM that consumes it, after an optional
random Hadamard transform shared by both operands of that GEMM: (A S H)(Hᵀ S B) = A·B.

Internally every GEMM runs in the canonical "TN" form lhs [B, M, K] x rhs [B, N, K] -> [B, M, N]
(contracting dim last in both operands: what cuBLASLt FP8 and cuDNN block-scaled GEMMs want), so
each quantization is along the last axis. Residuals saved for the backward pass are the quantized
operands of the backward GEMMs (X along tokens, W along out-features), not bf16 copies.

Delayed scaling (recipe.scaling "delayed", lowbit.scaling): per-tensor operands take their scale from
an amax history float32[3, H] (rows X, W, dY) passed in; the custom VJP returns the history with this
step's amaxes in front as the history's "gradient" (Flax fp8_ops' overwrite-with-gradient), since dY's
amax exists only in the backward pass. The train step stores that gradient instead of applying it.

Partial blocks: a contraction axis that is not a multiple of the block size is quantized with
`pad=True` (the last block as if zero-padded, exactly what padding the GEMM with zeros gives) on
the emulate and fp8 backends; the native backend needs whole blocks and raises quantize's error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.backends import get_gemm, select_backend
from lowbit.formats import get_format
from lowbit.kernels.dispatch import (
    block_values,
    quantize,
    quantize_scaled_with_transpose,
    quantize_with_transpose,
    use_fp8_cast,
)
from lowbit.quantize import BlockValues, QArray
from lowbit.recipes import OperandConfig, PassConfig, Recipe, get_recipe
from lowbit.scaling import ROW_DY, ROW_W, ROW_X, check_history, history_amax, scale_from_amax, updated_history

Operand = QArray | BlockValues | jax.Array

# fold_in constants: one key per call -> per pass -> per operand / Hadamard signs.
_PASS_IDS = {"fprop": 1, "dgrad": 2, "wgrad": 3}
_LHS, _RHS, _SIGNS = 1, 2, 3


class _Static(NamedTuple):
    """Hashable per-call configuration (nondiff argument of the custom VJPs)."""

    recipe: Recipe
    backend: str
    precision: Any
    out_dtype: Any
    lhs_dtype: Any
    rhs_dtype: Any
    impl: str = "xla"  # grouped GEMMs: "xla" (lax.ragged_dot) | "pallas" (lowbit.kernels.grouped_pallas)


# ----------------------------------------------------------------------------- small helpers
def _pass_keys(key: jax.Array | None, pass_name: str) -> tuple[Any, Any, Any]:
    """(lhs key, rhs key, Hadamard-sign key) of one pass, all derived from the call's key."""
    if key is None:
        return None, None, None
    pass_key = jax.random.fold_in(key, _PASS_IDS[pass_name])
    return tuple(jax.random.fold_in(pass_key, slot) for slot in (_LHS, _RHS, _SIGNS))


def _prepared(a: jax.Array) -> jax.Array:
    """A float operand, materialised: XLA fused a transpose into the quantize that followed and read
    along the strided axis; on an H100 this alone made mxfp8 fwd+bwd 27.8 ms instead of 12.5 ms
    (tools/profile_emulate.py, docs/benchmarks.md). The barrier is a no-op for contiguous inputs."""
    if a.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        a = a.astype(jnp.float32)
    return lax.optimization_barrier(a)


def _quantize_operand(a: jax.Array, cfg: OperandConfig, key: Any, axis: int | tuple[int, int],
                      pad: bool, values_dtype: Any = None) -> Operand:
    """Quantize `a` per `cfg` with blocks along `axis` (2-D tiles: the pair of axes); None: keep `a`.
    values_dtype (an emulated GEMM's operand, used at once): BlockValues where the kernel can emit them."""
    if not cfg.quantized:
        return a
    # dispatch.quantize: the fused Pallas kernel where lowbit.kernels.set_quantize_impl selects it
    # and it takes the call (same bits as lowbit.quantize, several times its bandwidth on an H100),
    # else lowbit.quantize's XLA ops; with values_dtype the kernel writes data · block scale only.
    return quantize(_prepared(a), cfg.format, axis=axis, rounding=cfg.rounding,
                    key=key if cfg.rounding == "stochastic" else None, scale_mode=cfg.scale_mode, pad=pad,
                    prescale=cfg.prescale, values_dtype=values_dtype)


def _delayed_scale(history: jax.Array | None, row: int, cfg: OperandConfig, recipe: Recipe) -> Any:
    """The tensor scale of operand `cfg` of tensor `row` from the amax history, or None (not delayed)."""
    if history is None or not cfg.quantized or get_format(cfg.format).kind != "tensor":
        return None
    return scale_from_amax(history_amax(history[row], recipe.amax_compute_algo), cfg.format)


def _scaled_operand(a: jax.Array, cfg: OperandConfig, key: Any, axis: int | tuple[int, int], pad: bool,
                    scale: Any, values_dtype: Any = None) -> tuple[Operand, Any]:
    """(quantized `a`, its amax): with a delayed `scale` the amax comes out of the cast, else None."""
    if scale is None:
        return _quantize_operand(a, cfg, key, axis, pad, values_dtype), None
    q, _, amax = quantize_scaled_with_transpose(_prepared(a), cfg.format, scale, cfg.rounding,
                                                key if cfg.rounding == "stochastic" else None,
                                                prescale=cfg.prescale, transpose=False)
    return q, amax


def _first(*amaxes: Any) -> jax.Array:
    """The amax one tensor's quantizations recorded (equal wherever several did); 0 if none did."""
    found = [a for a in amaxes if a is not None]
    return found[0] if found else jnp.zeros((), jnp.float32)


def _quantize_twins(a: jax.Array, cfg: OperandConfig, key: Any, pad: bool,
                    xla_quantizes_transpose: bool = False, scale: Any = None) -> tuple[Operand, Operand, Any]:
    """(q of a [B, P, Q], q of its transpose [B, Q, P]) for an orientation-free cfg (per-tensor or
    square tiles).

    Per-tensor FP8 where dispatch takes it: one kernel reads `a` once and writes both layouts (TE's
    cast_transpose). Otherwise one layout is quantized by XLA and its codes transposed:
    `xla_quantizes_transpose` picks the transposed one (W: quantizing W as stored and transposing its
    FP8 bytes made the fp8 linear layer 4% slower on an H100, docs/benchmarks.md, seventh session).
    The third value is the amax under a delayed `scale` (None otherwise).
    """
    fmt = get_format(cfg.format)
    kernel = fmt.kind == "tensor" and cfg.rounding == "nearest" and use_fp8_cast(a, fmt)
    if scale is not None:
        sr_key = key if cfg.rounding == "stochastic" else None
        if xla_quantizes_transpose and not kernel:
            q_t, q, amax = quantize_scaled_with_transpose(_prepared(jnp.swapaxes(a, 1, 2)), fmt, scale,
                                                          cfg.rounding, sr_key, prescale=cfg.prescale)
            return q, q_t, amax
        return quantize_scaled_with_transpose(_prepared(a), fmt, scale, cfg.rounding, sr_key,
                                              prescale=cfg.prescale)
    if kernel:
        return (*quantize_with_transpose(_prepared(a), fmt, prescale=cfg.prescale), None)
    src = jnp.swapaxes(a, 1, 2) if xla_quantizes_transpose else a
    q = _quantize_operand(src, cfg, key, _tn_axis(cfg), pad)
    return ((_swap_last(q), q) if xla_quantizes_transpose else (q, _swap_last(q))) + (None,)


def _tn_axis(cfg: OperandConfig) -> int | tuple[int, int]:
    """Block axes of a canonical [B, rows, K] operand: K, or (rows, K) tiles."""
    return (1, 2) if cfg.block_2d else 2


def _swap_last(a: Operand) -> Operand:
    """[B, P, Q] -> [B, Q, P] for arrays and QArrays (valid for per-tensor and square 2-D tiles)."""
    if not isinstance(a, QArray):
        return jnp.swapaxes(a, 1, 2)
    if a.fmt.kind != "tensor" and a.axis != (1, 2):
        raise ValueError(f"cannot transpose a QArray blocked along axis {a.axis} only")
    scale = None if a.scale is None else jnp.swapaxes(a.scale, 1, 2)
    return dataclasses.replace(a, data=jnp.swapaxes(a.data, 1, 2), scale=scale)


def _rht_pair(pc: PassConfig, key: Any, a: jax.Array, b: jax.Array,
              axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Apply the same random orthonormal H·diag(s) to both operands along their contraction axis."""
    if pc.hadamard_block is None:
        return a, b
    from lowbit.hadamard import random_hadamard

    def transform(x):
        x = x if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)
        return random_hadamard(x, key, axis=axis, block=pc.hadamard_block)

    return transform(a), transform(b)


def _reusable(shared: OperandConfig, *passes: PassConfig) -> bool:
    """A quantized tensor can serve two GEMMs if its blocks are orientation-free and no RHT intervenes."""
    if not shared.quantized or any(p.hadamard_block for p in passes):
        return False
    return shared.block_2d or get_format(shared.format).kind == "tensor"


def _values_dtype(static: _Static) -> Any:
    """The dtype of block values for an emulated GEMM's operands used at once (None: other backends)."""
    return jnp.dtype(static.recipe.compute_dtype) if static.backend == "emulate" else None


def _gemm(static: _Static, lhs: Operand, rhs: Operand, out_dtype: Any) -> jax.Array:
    # A pass the recipe keeps in high precision (e.g. mxfp4's bf16 fprop) is a plain GEMM on any backend.
    backend = static.backend
    if not isinstance(lhs, QArray) and not isinstance(rhs, QArray):
        backend = "emulate"
    return get_gemm(backend)(lhs, rhs, out_dtype=out_dtype,
                                    compute_dtype=jnp.dtype(static.recipe.compute_dtype),
                                    precision=static.precision)


# ----------------------------------------------------------------------------- dense GEMM (custom VJP)
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qmatmul(x: jax.Array, w: jax.Array, key: Any, history: Any, static: _Static) -> jax.Array:
    """Quantized x [B, M, K] · w [B, K, N] -> [B, M, N] (canonical form of dot_general); `history`:
    the amax history of delayed scaling, or None."""
    return _qmatmul_fwd(x, w, key, history, static)[0]


def _qmatmul_fwd(x, w, key, history, static: _Static):
    r = static.recipe
    pad = static.backend != "native"
    fprop, dgrad, wgrad = r.fprop, r.dgrad, r.wgrad
    scale = lambda row, cfg: _delayed_scale(history, row, cfg, r)
    # fprop: X [B,M,K] and Wᵀ [B,N,K], both blocked along K (features / in-features).
    # dgrad operand W [B,K,N] blocked along N (out-features); wgrad operand Xᵀ [B,K,M] along M (tokens).
    # An orientation-free quantization (_shared) serves both GEMMs: one quantize, two layouts.
    k_x, k_w, k_s = _pass_keys(key, "fprop")
    x_f, wt_f = _rht_pair(fprop, k_s, x, jnp.swapaxes(w, 1, 2))
    if _shared(fprop, "lhs", wgrad, "lhs"):
        qx, x_wgrad, amax_x = _quantize_twins(x, fprop.lhs, k_x, pad, scale=scale(ROW_X, fprop.lhs))
    else:
        qx, amax_fx = _scaled_operand(x_f, fprop.lhs, k_x, _tn_axis(fprop.lhs), pad, scale(ROW_X, fprop.lhs),
                                      _values_dtype(static))
        x_wgrad, amax_wx = _fresh_operand(wgrad, "wgrad", "lhs", jnp.swapaxes(x, 1, 2), key, pad,
                                          scale(ROW_X, wgrad.lhs))
        amax_x = _first(amax_fx, amax_wx)
    if _shared(fprop, "rhs", dgrad, "rhs"):
        w_dgrad, qwt, amax_w = _quantize_twins(w, fprop.rhs, k_w, pad, xla_quantizes_transpose=True,
                                               scale=scale(ROW_W, fprop.rhs))
    else:
        qwt, amax_fw = _scaled_operand(wt_f, fprop.rhs, k_w, _tn_axis(fprop.rhs), pad,
                                       scale(ROW_W, fprop.rhs), _values_dtype(static))
        w_dgrad, amax_dw = _fresh_operand(dgrad, "dgrad", "rhs", w, key, pad, scale(ROW_W, dgrad.rhs))
        amax_w = _first(amax_fw, amax_dw)
    y = _gemm(static, qx, qwt, static.out_dtype)
    amaxes = None if history is None else (history, _first(amax_x), _first(amax_w))
    return y, (x_wgrad, w_dgrad, key, amaxes)


def _shared(prev_pass: PassConfig, prev_side: str, cur_pass: PassConfig, cur_side: str) -> bool:
    """Whether operand `prev_side` of prev_pass, quantized once, also serves as `cur_side` of cur_pass
    (transposed): the same config, orientation-free blocks (per-tensor or square tiles), no RHT."""
    prev_cfg = getattr(prev_pass, prev_side)
    return getattr(cur_pass, cur_side) == prev_cfg and _reusable(prev_cfg, prev_pass, cur_pass)


def _fresh_operand(cur_pass: PassConfig, pass_name: str, side: str, a: jax.Array, key: Any,
                   pad: bool, scale: Any = None, values_dtype: Any = None) -> tuple[Operand, Any]:
    """(operand `side` of `cur_pass` from `a` (already in cur_pass's layout), quantized along cur_pass's
    contraction axis after cur_pass's RHT if any; its amax under a delayed `scale`, else None)."""
    cfg = getattr(cur_pass, side)
    k_lhs, k_rhs, k_rht = _pass_keys(key, pass_name)
    if cur_pass.hadamard_block is not None:
        a = _rht_pair(cur_pass, k_rht, a, a)[0]
    return _scaled_operand(a, cfg, k_lhs if side == "lhs" else k_rhs, _tn_axis(cfg), pad, scale, values_dtype)


def _qmatmul_bwd(static: _Static, residuals, dy):
    x_wgrad, w_dgrad, key, amaxes = residuals
    r = static.recipe
    pad = static.backend != "native"
    if static.backend == "emulate":  # stored quantized; the backward GEMMs take their bf16 block values
        x_wgrad, w_dgrad = (block_values(op, _values_dtype(static)) for op in (x_wgrad, w_dgrad))
    dgrad, wgrad = r.dgrad, r.wgrad
    history = None if amaxes is None else amaxes[0]
    scale = lambda cfg: _delayed_scale(history, ROW_DY, cfg, r)
    # dgrad: dX [B,M,K] = dY [B,M,N] · W [B,K,N]ᵀ, both blocked along N.
    # wgrad: dW [B,K,N] = Xᵀ [B,K,M] · dYᵀ [B,N,M], both blocked along M (tokens).
    k_dy, _, k_sd = _pass_keys(key, "dgrad")
    if _shared(dgrad, "lhs", wgrad, "rhs"):
        q_dy, q_dyt, amax_dy = _quantize_twins(dy, dgrad.lhs, k_dy, pad, scale=scale(dgrad.lhs))
    else:
        dy_d = dy if dgrad.hadamard_block is None else _rht_pair(dgrad, k_sd, dy, dy)[0]
        q_dy, amax_d = _scaled_operand(dy_d, dgrad.lhs, k_dy, _tn_axis(dgrad.lhs), pad, scale(dgrad.lhs),
                                       _values_dtype(static))
        q_dyt, amax_w = _fresh_operand(wgrad, "wgrad", "rhs", jnp.swapaxes(dy, 1, 2), key, pad,
                                       scale(wgrad.rhs), _values_dtype(static))
        amax_dy = _first(amax_d, amax_w)
    dx = _gemm(static, q_dy, w_dgrad, static.lhs_dtype)
    dw = _gemm(static, x_wgrad, q_dyt, static.rhs_dtype)
    return dx, dw, None, _history_cotangent(amaxes, amax_dy)


def _history_cotangent(amaxes: Any, amax_dy: Any) -> Any:
    """The amax history's "gradient": the history with this step's (X, W, dY) amaxes in front."""
    if amaxes is None:
        return None
    history, amax_x, amax_w = amaxes
    return updated_history(history, jnp.stack([amax_x, amax_w, _first(amax_dy)]))


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# ----------------------------------------------------------------------------- dot_general
def _canonical_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int):
    (lc, rc), (lb, rb) = dimension_numbers
    norm = lambda dims, n: tuple(int(d) % n for d in dims)
    lc, lb = norm(lc, lhs_ndim), norm(lb, lhs_ndim)
    rc, rb = norm(rc, rhs_ndim), norm(rb, rhs_ndim)
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers {dimension_numbers} pair unequal numbers of dims")
    lf = tuple(d for d in range(lhs_ndim) if d not in lc + lb)
    rf = tuple(d for d in range(rhs_ndim) if d not in rc + rb)
    return lc, rc, lb, rb, lf, rf


def _history_arg(recipe: Recipe, amax_history: Any, where: str) -> Any:
    """The amax history a delayed-scaling recipe needs (checked), None for current scaling."""
    if not recipe.delayed:
        if amax_history is not None:
            raise ValueError(f"{where}: recipe {recipe.name!r} uses current scaling; amax_history is only "
                             "for recipes with scaling: delayed")
        return None
    if amax_history is None:
        raise ValueError(
            f"recipe {recipe.name!r} uses delayed scaling and needs its amax history: pass "
            f"amax_history=... (float32[3, {recipe.amax_history_len}], lowbit.scaling.init_history) to "
            f"{where} and store the history's gradient as the next history, or use "
            "lowbit.nn.QuantDotGeneral, which holds it as a lowbit.nn.AmaxHistory variable")
    return check_history(amax_history, recipe.amax_history_len, where)


def quantized_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, recipe: Recipe, *,
                          key: jax.Array | None = None, precision: Any = None,
                          preferred_element_type: Any = None, backend: str | None = None,
                          amax_history: jax.Array | None = None) -> jax.Array:
    """lax.dot_general(lhs, rhs, dimension_numbers) with fprop/dgrad/wgrad quantized per `recipe`.

    Batch dims map to B, free lhs dims are flattened into M (tokens), contracting dims into K.
    amax_history: float32[3, H] for a delayed-scaling recipe (its gradient is the updated history).
    """
    history = _history_arg(recipe, amax_history, "quantized_dot_general")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    lc, rc, lb, rb, lf, rf = _canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
    for a, b in zip(lc + lb, rc + rb, strict=True):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"dot_general: lhs dim {a} (size {lhs.shape[a]}) and rhs dim {b} "
                             f"(size {rhs.shape[b]}) are paired but differ")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    size = lambda shape, dims: math.prod(shape[d] for d in dims)
    nb, m = size(lhs.shape, lb), size(lhs.shape, lf)
    k, n = size(lhs.shape, lc), size(rhs.shape, rf)
    x = jnp.transpose(lhs, lb + lf + lc).reshape(nb, m, k)
    w = jnp.transpose(rhs, rb + rc + rf).reshape(nb, k, n)
    static = _Static(recipe, backend or select_backend(recipe), precision, out_dtype,
                     lhs.dtype, rhs.dtype)
    y = _qmatmul(x, w, key, history, static)
    out_shape = [lhs.shape[d] for d in lb + lf] + [rhs.shape[d] for d in rf]
    return y.reshape(out_shape)


def _missing_key_error(recipe: Recipe, where: str) -> ValueError:
    return ValueError(
        f"recipe {recipe.name!r} uses stochastic rounding or a random Hadamard transform and needs "
        f"fresh random bits every call: pass key=... to {where}, or use lowbit.nn.QuantDotGeneral "
        "(keys from the NNX 'quant' RNG stream) / lowbit.linen.QuantDotGeneral"
    )


def dot_general(recipe: Recipe | str, backend: str | None = None) -> Callable[..., jax.Array]:
    """A drop-in for jax.lax.dot_general whose three GEMMs are quantized as `recipe` says.

    fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None,
    *, key=None, amax_history=None); a recipe without any quantized pass returns exactly
    lax.dot_general's result. amax_history: required by (only by) delayed-scaling recipes.
    """
    recipe = get_recipe(recipe)

    def quantized(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  out_sharding=None, *, key=None, amax_history=None):
        if not recipe.quantized:
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
        if recipe.needs_rng and key is None:
            raise _missing_key_error(recipe, "the dot_general function")
        y = quantized_dot_general(lhs, rhs, dimension_numbers, recipe, key=key, precision=precision,
                                  preferred_element_type=preferred_element_type, backend=backend,
                                  amax_history=amax_history)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    quantized.recipe = recipe
    quantized.__name__ = quantized.__qualname__ = f"dot_general[{recipe.name}]"
    return quantized


# ----------------------------------------------------------------------------- einsum
def _parse_einsum(subscripts: str, lhs_ndim: int, rhs_ndim: int):
    """'btd,dnh->btnh' -> (dimension_numbers, output permutation) for a two-operand einsum."""
    spec = subscripts.replace(" ", "")
    if "->" not in spec or "." in spec or spec.count(",") != 1:
        raise NotImplementedError(
            f"lowbit's quantized einsum supports explicit two-operand forms like 'btd,dh->bth' "
            f"(no ellipsis, '->' required); got {subscripts!r}. Keep this module in high precision "
            "with a rule, or use dot_general"
        )
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    if len(a) != lhs_ndim or len(b) != rhs_ndim:
        raise ValueError(f"einsum {subscripts!r} does not match operand ranks {lhs_ndim} and {rhs_ndim}")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        raise NotImplementedError(f"repeated indices (traces/diagonals) are not supported: {subscripts!r}")
    unknown = set(out) - set(a) - set(b)
    if unknown or any(c not in out and c not in b for c in a) or any(c not in out and c not in a for c in b):
        raise NotImplementedError(
            f"einsum {subscripts!r}: every index must be contracted between the operands or kept in "
            "the output (no summation over one operand's own axis)"
        )
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    produced = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    return dims, tuple(produced.index(c) for c in out)


def einsum(recipe: Recipe | str, backend: str | None = None) -> Callable[..., jax.Array]:
    """A drop-in for jnp.einsum (two operands, explicit output) built on the quantized dot_general.

    fn(subscripts, lhs, rhs, *, precision=None, preferred_element_type=None, key=None, amax_history=None).
    """
    dg = dot_general(recipe, backend)

    def quantized_einsum(subscripts, lhs, rhs, *, precision=None, preferred_element_type=None,
                         out_sharding=None, key=None, amax_history=None, **unused):
        lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
        dims, perm = _parse_einsum(subscripts, lhs.ndim, rhs.ndim)
        kwargs = {} if key is None else {"key": key}
        if amax_history is not None:
            kwargs["amax_history"] = amax_history
        y = dg(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type,
               **kwargs)
        y = jnp.transpose(y, perm)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    quantized_einsum.recipe = dg.recipe
    return quantized_einsum


# ----------------------------------------------------------------------------- grouped GEMM (MoE)
def _group_block(wgrad: PassConfig) -> int:
    """Token alignment of each group for wgrad: blocks (and Hadamard blocks) never straddle groups."""
    sizes = [1]
    for op in (wgrad.lhs, wgrad.rhs):
        if op.quantized:
            sizes.append(get_format(op.format).block_size or 1)
    if wgrad.hadamard_block:
        sizes.append(wgrad.hadamard_block)
    return math.lcm(*sizes)


def _padded_rows(group_sizes: jax.Array, num_rows: int, block: int) -> tuple[jax.Array, jax.Array, int]:
    """Destination row of each of num_rows sorted tokens when every group starts on a block boundary.

    Returns (dest int32[num_rows], rows past sum(group_sizes) sent out of range; padded group sizes;
    the padded row count, a static bound num_rows + E·(block - 1) rounded up to a block).
    """
    num_groups = group_sizes.shape[0]
    padded_total = -(-(num_rows + num_groups * (block - 1)) // block) * block
    sizes = group_sizes.astype(jnp.int32)
    padded_sizes = -(-sizes // block) * block
    ends = jnp.cumsum(sizes)
    group_of_row = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
    valid = group_of_row < num_groups
    g = jnp.minimum(group_of_row, num_groups - 1)
    offset_in_group = jnp.arange(num_rows, dtype=jnp.int32) - (ends - sizes)[g]
    dest = (jnp.cumsum(padded_sizes) - padded_sizes)[g] + offset_in_group
    return jnp.where(valid, dest, padded_total), padded_sizes, padded_total


def _scatter_rows(a: jax.Array, dest: jax.Array, total: int) -> jax.Array:
    return jnp.zeros((total, *a.shape[1:]), a.dtype).at[dest].set(a, mode="drop")


def _values(op: Operand) -> jax.Array:
    """Float32 values of an operand (dequantized QArray, or the array itself)."""
    return op.dequantize(jnp.float32) if isinstance(op, QArray) else op.astype(jnp.float32)


_WGRAD_RAGGED_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
RAGGED_IMPLS = ("xla", "pallas")
_KERNEL_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def _kernel_operand(op: Operand) -> tuple[jax.Array, jax.Array | None, float]:
    """(values the Pallas kernel multiplies exactly, tensor scale or None, prescale): op = values·ts/prescale.

    Per-tensor FP8: the e4m3/e5m2 data itself. MX: element·2^s in bfloat16, exact: an element has
    <= 4 significant bits (E4M3, E2M3; E2M1, E3M2, E5M2 fewer), a power of two adds none, and
    bfloat16 holds 8 with float32's exponent range (only |values| < 2^-130 can lose bits, in blocks
    whose amax is below 2^-102: E5M2's 2^-16 quantum times 2^s must stay >= 2^-133).
    NVFP4: element·block scale in bfloat16, exact: E2M1 (2 bits) times E4M3 (4 bits) has <= 6
    significant bits, in [2^-10, 2688].
    The NVFP4 FP32 tensor scale (24 bits) and 1/prescale (3/4: not a power of two) would round a
    bfloat16 product, so they are returned apart and applied to the float32 accumulator.
    High-precision operands pass as they are.
    """
    if not isinstance(op, QArray):
        return (op if op.dtype in _KERNEL_FLOATS else op.astype(jnp.float32)), None, 1.0
    if op.fmt.kind == "tensor" and op.data.dtype in _FP8_DTYPES:
        return op.data, op.tensor_scale, op.prescale
    if op.fmt.kind == "tensor":  # a per-tensor format without an FP8 container: values in float32
        return op.data.astype(jnp.float32), op.tensor_scale, op.prescale
    unit = None if op.tensor_scale is None else jnp.ones((), jnp.float32)
    blocks_only = dataclasses.replace(op, tensor_scale=unit, prescale=1.0)
    return blocks_only.dequantize(jnp.bfloat16), op.tensor_scale, op.prescale


def _apply_output_scales(acc: jax.Array, tensor_scales: tuple[Any, ...], prescales: tuple[float, ...],
                         owned: jax.Array) -> jax.Array:
    """acc · ts_lhs · ts_rhs / (p_lhs · p_rhs) in float32; outputs no group owns stay exactly zero.

    One scalar at a time (not ts_lhs·ts_rhs first, which can underflow for small gradients). `owned`
    keeps lax.ragged_dot's zeros past the groups even when a non-finite input made a scale NaN.
    """
    scales = [ts for ts in tensor_scales if ts is not None]
    prescale = math.prod(prescales)
    if not scales and prescale == 1.0:
        return acc
    for ts in scales:
        acc = acc * ts
    if prescale != 1.0:
        acc = acc / jnp.float32(prescale)
    return jnp.where(owned, acc, 0.0) if scales else acc


GROUPED_FP8_KERNELS = ("auto", "mosaic", "triton")


def _grouped_fp8_kernel(a: jax.Array, b: jax.Array, layout: str) -> str:
    """'mosaic' or 'triton' for a grouped GEMM of kernel operands a [T, K], b [E, N, K] | [E, K, N].

    $LOWBIT_GROUPED_FP8 (auto | mosaic | triton): auto takes lowbit.kernels.grouped_mosaic (TMA + WGMMA,
    0.82-0.86x dense cuBLAS FP8 on an H100; Triton: 0.57-0.61x) for FP8 operands of one dtype on a Hopper
    GPU when K % 128 == 0 and N % 256 == 0, and the Triton kernel otherwise (mixed e5m2 x e4m3: WGMMA in
    Mosaic GPU takes one dtype; Blackwell: no WGMMA; CPU: Triton's interpret mode).
    """
    choice = os.environ.get("LOWBIT_GROUPED_FP8", "auto")
    if choice not in GROUPED_FP8_KERNELS:
        raise ValueError(f"LOWBIT_GROUPED_FP8 must be one of {GROUPED_FP8_KERNELS}, got {choice!r}")
    k_size, n_size = a.shape[1], (b.shape[1] if layout == "enk" else b.shape[2])
    fits = (a.dtype == b.dtype and a.dtype in _FP8_DTYPES and layout == "enk" and k_size % 128 == 0
            and n_size % 256 == 0)
    if choice == "triton" or not fits:
        return "triton"
    if choice == "mosaic":
        return "mosaic"
    device = jax.devices()[0]
    return "mosaic" if device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9") else "triton"


def _pallas_ragged(lhs: Operand, rhs: Operand, group_sizes: jax.Array, rhs_contract: int,
                   out_dtype: Any) -> jax.Array:
    """out[t] = lhs[t] · rhs[g(t)] (rhs dim rhs_contract contracted) on a grouped Pallas kernel, f32 sums."""
    from lowbit.kernels.grouped_pallas import group_bounds, grouped_matmul  # lazy: Pallas only when asked for

    a, ts_a, p_a = _kernel_operand(lhs)
    b, ts_b, p_b = _kernel_operand(rhs)
    layout = "ekn" if rhs_contract == 1 else "enk"
    if layout == "ekn" and b.dtype in _FP8_DTYPES:
        # Hopper's FP8 MMA takes both operands K-major: store W as [E, N, K] (a copy of FP8 bytes).
        b, layout = jnp.swapaxes(b, 1, 2), "enk"
    if _grouped_fp8_kernel(a, b, layout) == "mosaic":
        from lowbit.kernels.grouped_mosaic import grouped_matmul_mosaic  # lazy: Mosaic GPU only on Hopper

        # One f32 scale on the accumulator, then the cast in the kernel: ts_a·ts_b/(p_a·p_b) of per-tensor
        # FP8 operands (amax/448-sized each) is far from f32's underflow; rows no group owns stay zero.
        scales = [ts for ts in (ts_a, ts_b) if ts is not None]
        scale = None
        if scales or p_a * p_b != 1.0:
            scale = math.prod(scales, start=jnp.ones((), jnp.float32)) / jnp.float32(p_a * p_b)
        return grouped_matmul_mosaic(a, b, group_sizes, rhs_layout="enk", scale=scale,
                                     preferred_element_type=out_dtype)
    acc = grouped_matmul(a, b, group_sizes, preferred_element_type=jnp.float32, rhs_layout=layout)
    # rows some group owns, by the kernel's own rule (clipped group bounds)
    owned = (jnp.arange(acc.shape[0]) < jnp.sum(group_bounds(group_sizes, acc.shape[0])[1]))[:, None]
    return _apply_output_scales(acc, (ts_a, ts_b), (p_a, p_b), owned).astype(out_dtype)


def _ragged(static: _Static, lhs: Operand, rhs: Operand, group_sizes, out_dtype,
            rhs_contract: int = 1) -> jax.Array:
    """out[t] = lhs[t] · rhs[g(t)], rhs [E, K, N] (rhs_contract 1) or [E, N, K] (2: the dgrad's W)."""
    if static.impl == "pallas":
        return _pallas_ragged(lhs, rhs, group_sizes, rhs_contract, out_dtype)
    rhs_values = _values(rhs) if rhs_contract == 1 else jnp.swapaxes(_values(rhs), 1, 2)
    y = lax.ragged_dot(_values(lhs), rhs_values, group_sizes, precision=static.precision,
                       preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _ragged_wgrad(static: _Static, x_pad: Operand, dy_pad: Operand, padded_sizes: jax.Array,
                  out_dtype: Any) -> jax.Array:
    """dW[e] = X_eᵀ · dY_e over the block-aligned rows of each group: [E, K, N]."""
    if static.impl != "pallas":
        dw = lax.ragged_dot_general(_values(x_pad), _values(dy_pad), padded_sizes, _WGRAD_RAGGED_DIMS,
                                    precision=static.precision, preferred_element_type=jnp.float32)
        return dw.astype(out_dtype)
    from lowbit.kernels.grouped_pallas import group_bounds, grouped_wgrad  # lazy: Pallas only when asked for

    a, ts_a, p_a = _kernel_operand(x_pad)
    b, ts_b, p_b = _kernel_operand(dy_pad)
    acc = grouped_wgrad(a, b, padded_sizes, preferred_element_type=jnp.float32)
    has_rows = (group_bounds(padded_sizes, a.shape[0])[1] > 0)[:, None, None]  # the kernel's own row rule
    return _apply_output_scales(acc, (ts_a, ts_b), (p_a, p_b), has_rows).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _qragged(x: jax.Array, w: jax.Array, group_sizes: jax.Array, key: Any, history: Any,
             static: _Static) -> jax.Array:
    """Quantized grouped GEMM: rows of x [T, K] in groups (group_sizes [E]) times w [E, K, N]."""
    return _qragged_fwd(x, w, group_sizes, key, history, static)[0]


def _qragged_fwd(x, w, group_sizes, key, history, static: _Static):
    r = static.recipe
    fprop, dgrad, wgrad = r.fprop, r.dgrad, r.wgrad
    scale = lambda row, cfg: _delayed_scale(history, row, cfg, r)
    # fprop: X [T,K] along K; W [E,K,N] along K (axis 1), or 16x16 tiles of (K, N).
    k_x, k_w, k_s = _pass_keys(key, "fprop")
    x_f, w_f = (x, w) if fprop.hadamard_block is None else (
        _rht_pair(fprop, k_s, x, x)[0], _rht_pair(fprop, k_s, w, w, axis=1)[0])
    qx, amax_fx = _scaled_operand(x_f, fprop.lhs, k_x, -1, True, scale(ROW_X, fprop.lhs))
    qw, amax_fw = _scaled_operand(w_f, fprop.rhs, k_w, (1, 2) if fprop.rhs.block_2d else 1, True,
                                  scale(ROW_W, fprop.rhs))
    y = _ragged(static, qx, qw, group_sizes, static.out_dtype)
    # dgrad operand: W [E,K,N] blocked along N (axis 2).
    amax_dw = None
    if dgrad.rhs == fprop.rhs and _reusable(fprop.rhs, fprop, dgrad):
        w_dgrad = qw
    else:
        _, k_wd, k_sd = _pass_keys(key, "dgrad")
        w_d = w if dgrad.hadamard_block is None else _rht_pair(dgrad, k_sd, w, w, axis=2)[0]
        w_dgrad, amax_dw = _scaled_operand(w_d, dgrad.rhs, k_wd, (1, 2) if dgrad.rhs.block_2d else 2, True,
                                           scale(ROW_W, dgrad.rhs))
    # wgrad operand: X rows scattered so that each group starts on a block boundary, blocked along tokens.
    k_xw, _, k_sw = _pass_keys(key, "wgrad")
    dest, padded_sizes, total = _padded_rows(group_sizes, x.shape[0], _group_block(wgrad))
    x_pad = _scatter_rows(x, dest, total)
    x_pad = x_pad if wgrad.hadamard_block is None else _rht_pair(wgrad, k_sw, x_pad, x_pad, axis=0)[0]
    x_wgrad, amax_wx = _scaled_operand(x_pad, wgrad.lhs, k_xw, (0, 1) if wgrad.lhs.block_2d else 0, True,
                                       scale(ROW_X, wgrad.lhs))
    amaxes = None if history is None else (history, _first(amax_fx, amax_wx), _first(amax_fw, amax_dw))
    return y, (x_wgrad, w_dgrad, group_sizes, dest, padded_sizes, key, amaxes)


def _qragged_bwd(static: _Static, residuals, dy):
    x_wgrad, w_dgrad, group_sizes, dest, padded_sizes, key, amaxes = residuals
    r = static.recipe
    dgrad, wgrad = r.dgrad, r.wgrad
    history = None if amaxes is None else amaxes[0]
    scale = lambda cfg: _delayed_scale(history, ROW_DY, cfg, r)
    # dgrad: dX [T,K] = dY [T,N] · W[g]ᵀ, both blocked along N.
    k_dy, _, k_sd = _pass_keys(key, "dgrad")
    dy_d = dy if dgrad.hadamard_block is None else _rht_pair(dgrad, k_sd, dy, dy)[0]
    q_dy, amax_d = _scaled_operand(dy_d, dgrad.lhs, k_dy, -1, True, scale(dgrad.lhs))
    dx = _ragged(static, q_dy, w_dgrad, group_sizes, static.lhs_dtype, rhs_contract=2)  # W [E,K,N] over N
    # wgrad: dW[e] = X_eᵀ · dY_e over the block-aligned rows of group e, both blocked along tokens.
    _, k_dyw, k_sw = _pass_keys(key, "wgrad")
    dy_pad = _scatter_rows(dy, dest, x_wgrad.shape[0])
    dy_pad = dy_pad if wgrad.hadamard_block is None else _rht_pair(wgrad, k_sw, dy_pad, dy_pad, axis=0)[0]
    q_dy_pad, amax_w = _scaled_operand(dy_pad, wgrad.rhs, k_dyw, (0, 1) if wgrad.rhs.block_2d else 0, True,
                                       scale(wgrad.rhs))
    dw = _ragged_wgrad(static, x_wgrad, q_dy_pad, padded_sizes, static.rhs_dtype)
    return dx, dw, None, None, _history_cotangent(amaxes, _first(amax_d, amax_w))


_qragged.defvjp(_qragged_fwd, _qragged_bwd)


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, recipe: Recipe | str = "bf16",
               key: jax.Array | None = None, preferred_element_type: Any = None,
               precision: Any = None, impl: str = "xla", amax_history: jax.Array | None = None) -> jax.Array:
    """Grouped GEMM out[t] = lhs[t] · rhs[g(t)] (rows sorted by group), quantized per `recipe`.

    lhs [T, K], rhs [E, K, N], group_sizes int[E] -> [T, N]. fprop blocks along K, dgrad along N,
    wgrad along each group's own tokens (groups padded to whole blocks, never sharing a block).
    impl="xla": dequantized float32 operands into lax.ragged_dot / ragged_dot_general (emulation).
    impl="pallas": the same quantized operands into lowbit.kernels.grouped_pallas (one launch per
    GEMM): FP8 data as it is, MX/NVFP4 blocks as exact bfloat16 values, tensor scales and prescale
    on the float32 accumulator, so the products are the same and only the float32 summation order
    and the rounding of the scale multiplies (once on the sum, not per element) differ from "xla";
    no case needs the float32 kernel except operands a pass keeps in high precision (their own
    dtype). `precision` applies to "xla" only (the kernel's float32 dots use Triton's default, TF32,
    on a GPU). amax_history: as for quantized_dot_general (delayed-scaling recipes only).
    """
    if impl not in RAGGED_IMPLS:
        raise ValueError(f"ragged_dot impl must be one of {RAGGED_IMPLS} ('xla': lax.ragged_dot, "
                         f"'pallas': lowbit.kernels.grouped_pallas), got {impl!r}")
    recipe = get_recipe(recipe)
    history = _history_arg(recipe, amax_history, "ragged_dot")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"ragged_dot expects lhs [T, K], rhs [E, K, N], group_sizes [E]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    if not recipe.quantized:
        if impl == "pallas":
            from lowbit.kernels.grouped_pallas import grouped_matmul  # lazy: Pallas only when asked for

            return grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
        return lax.ragged_dot(lhs, rhs, group_sizes, precision=precision,
                              preferred_element_type=preferred_element_type)
    if recipe.needs_rng and key is None:
        raise _missing_key_error(recipe, "ragged_dot")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    static = _Static(recipe, "emulate", precision, out_dtype, lhs.dtype, rhs.dtype, impl)
    return _qragged(lhs, rhs, group_sizes, key, history, static)


__all__ = ["dot_general", "einsum", "quantized_dot_general", "ragged_dot"]

