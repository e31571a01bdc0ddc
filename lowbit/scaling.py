"""Delayed per-tensor scaling: the scale of step t comes from the amaxes of earlier steps.

s_t = amax(h) / elem_max with h the amax history (newest first; amax(h) = max(h) or h[0]); x is cast
with s_t, saturating at ±elem_max, and |x|'s own amax enters h for step t+1 (Transformer Engine's
DelayedScaling; Flax fp8_ops). The amax then rides along the cast instead of being a pass before it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowbit.formats import Format, get_format
from lowbit.quantize import (
    QArray,
    _check_args,
    _div_rn,
    _finite_amax,
    _flush_subnormals,
    _round_elements,
    _scale_of_amax,
)

# One history row per tensor of a linear layer: lhs X, rhs W, output gradient dY.
HISTORY_ROWS = ("x", "w", "dy")
ROW_X, ROW_W, ROW_DY = range(3)
AMAX_ALGOS = ("max", "most_recent")


def init_history(length: int) -> jax.Array:
    """An empty amax history float32[3, length] (rows HISTORY_ROWS): every tensor's scale is 1 until
    a training step writes its amax (lowbit.train spends its first step on exactly that)."""
    return jnp.zeros((len(HISTORY_ROWS), length), jnp.float32)


def check_history(history: Any, length: int, where: str) -> jax.Array:
    """`history` as a float32[3, length] array, or a ValueError naming the shape it needs."""
    history = jnp.asarray(history)
    if history.shape != (len(HISTORY_ROWS), length) or history.dtype != jnp.float32:
        raise ValueError(
            f"{where}: amax_history must be float32[{len(HISTORY_ROWS)}, {length}] (rows {HISTORY_ROWS}, "
            f"the recipe's amax_history_len), got {history.dtype}{list(history.shape)}; start from "
            "lowbit.scaling.init_history(recipe.amax_history_len)")
    return history


def history_amax(row: jax.Array, algo: str) -> jax.Array:
    """The amax a delayed scale is computed from: max over the history, or its newest entry."""
    if algo not in AMAX_ALGOS:
        raise ValueError(f"unknown amax_compute_algo {algo!r}; choose one of {AMAX_ALGOS}")
    return jnp.max(row) if algo == "max" else row[0]


def scale_from_amax(amax: jax.Array, fmt: Format | str) -> jax.Array:
    """s = amax / elem_max (correctly rounded, >= 2^-126) as current scaling takes it; 1 when amax is 0
    (an empty history) or not finite."""
    amax = jnp.asarray(amax, jnp.float32)
    usable = (amax > 0) & jnp.isfinite(amax)
    return jnp.where(usable, _scale_of_amax(jnp.where(usable, amax, 0.0), get_format(fmt)), 1.0
                     ).astype(jnp.float32)


def updated_history(history: jax.Array, amaxes: jax.Array) -> jax.Array:
    """Roll every row one step older and put this step's amaxes [..., 3] in front (column 0); leading
    axes (a scan's stacked layers) are kept."""
    return jnp.roll(history, 1, axis=-1).at[..., 0].set(jnp.asarray(amaxes, jnp.float32))


def next_history(history: jax.Array, gradient: jax.Array) -> jax.Array:
    """The stored history after a step, from the history's gradient (the custom VJP's updated_history).

    The older columns are rebuilt from `history` itself and only column 0 is read from the gradient:
    autodiff sums the gradients of a hook called k times per step (MoE experts: wi_0, wi_1, wo share
    one), so its column 0 holds the sum of the k amaxes, >= their max (no saturation, at most log2(k)
    binades of headroom spent), while its older columns would be k times the old ones. A history whose
    gradient is all zero (its hook did not run) keeps its value.
    """
    used = jnp.any(gradient != 0)
    return jnp.where(used, updated_history(history, gradient[..., :, 0]), history)


def tensor_amax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max |x| over finite, normal-flushed float32 elements, whether any element is NaN/Inf)."""
    return _finite_amax(_flush_subnormals(jnp.asarray(x).astype(jnp.float32)), initial=0.0)


def quantize_scaled(x: jax.Array, fmt: Format | str, tensor_scale: jax.Array, rounding: str = "nearest",
                    key: jax.Array | None = None, *, prescale: float = 1.0) -> tuple[QArray, jax.Array]:
    """Per-tensor quantize with a given scale s: data = round(clip(x · (1/s) · prescale, ±max)).

    Returns (QArray, amax of x for the history). NaN/Inf elements encode as 0 and make the QArray's
    tensor scale NaN (its dequantized values and every GEMM with it are NaN, as with current scaling);
    the amax counts only finite elements, so one bad step does not poison the history.
    """
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    _check_args(x, rounding, key, "floor")
    if fmt.kind != "tensor":
        raise ValueError(f"quantize_scaled is for per-tensor formats (fp8, fp8_e5m2), got {fmt.name!r}; "
                         "block-scaled formats compute their scales from each block")
    xf = _flush_subnormals(x.astype(jnp.float32))
    finite = jnp.isfinite(xf)
    amax, poisoned = _finite_amax(xf, initial=0.0)
    scale = jnp.asarray(tensor_scale, jnp.float32)
    y = jnp.where(finite, xf, 0.0) * _div_rn(1.0, scale)
    data = _round_elements(y, fmt, rounding, key, float(prescale)).astype(fmt.storage_dtype)
    scale = jnp.where(poisoned, jnp.nan, scale).astype(jnp.float32)
    return QArray(data, None, scale, fmt, tuple(range(x.ndim)), float(prescale)), amax


__all__ = ["AMAX_ALGOS", "HISTORY_ROWS", "check_history", "history_amax", "init_history", "next_history",
           "quantize_scaled", "scale_from_amax", "tensor_amax", "updated_history"]
