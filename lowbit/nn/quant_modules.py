"""NNX modules with jax.lax.dot_general's / ragged_dot's / jnp.einsum's call signatures.

They hold a Recipe and, when the recipe uses stochastic rounding or a random Hadamard transform,
the NNX RNG stream `quant`, from which every call draws a fresh key (never a fixed key). A recipe with
delayed scaling adds an `AmaxHistory` variable per module: differentiate the loss with respect to it
too and store its gradient as its new value (`update_amax_histories`), as lowbit.train does.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lowbit.dot import dot_general, einsum, ragged_dot
from lowbit.recipes import Recipe, get_recipe
from lowbit.scaling import init_history, next_history


class AmaxHistory(nnx.Variable):
    """float32[3, H] amaxes of (X, W, dY), newest first (lowbit.scaling). Not a parameter: its
    "gradient" is its next value, which the optimizer must store, not apply."""


def update_amax_histories(model: nnx.Module, grads: nnx.State) -> None:
    """Store each AmaxHistory's next value (lowbit.scaling.next_history of its gradient in `grads`, taken
    with nnx.DiffState over AmaxHistory) in `model`.

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, (nnx.Param, AmaxHistory)))(model, ...); then
    optimizer.update(model, grads.filter(nnx.Param)) and update_amax_histories(model, grads).
    """
    grads = nnx.filter_state(grads, AmaxHistory) if hasattr(nnx, "filter_state") \
        else grads.filter(AmaxHistory)
    current = nnx.state(model, AmaxHistory)
    nnx.update(model, jax.tree.map(next_history, current, grads))


def _quant_stream(recipe: Recipe, rngs: nnx.Rngs | None, owner: str) -> Any:
    """The `quant` RngStream if the recipe needs random bits, else None (error if it is missing)."""
    if not recipe.needs_rng:
        return None
    if rngs is None or "quant" not in rngs:
        raise ValueError(
            f"{owner}: recipe {recipe.name!r} uses stochastic rounding or a random Hadamard "
            "transform and needs an RNG stream named 'quant': pass rngs=nnx.Rngs(params=..., quant=...)"
        )
    return rngs.quant


class _QuantOp(nnx.Module):
    def __init__(self, recipe: Recipe | str, *, rngs: nnx.Rngs | None = None, backend: str | None = None):
        self.recipe = get_recipe(recipe)
        self.backend = backend
        self.quant_rng = _quant_stream(self.recipe, rngs, type(self).__name__)
        self.amax_history = AmaxHistory(init_history(self.recipe.amax_history_len)) if self.recipe.delayed \
            else None

    def _key(self) -> dict[str, jax.Array]:
        kwargs = {} if self.quant_rng is None else {"key": self.quant_rng()}
        if self.amax_history is not None:
            kwargs["amax_history"] = self.amax_history[...]
        return kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.recipe.name!r})"


class QuantDotGeneral(_QuantOp):
    """Quantized `jax.lax.dot_general`: nnx.Linear(..., dot_general=QuantDotGeneral(recipe, rngs=rngs))."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                 preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
        fn = dot_general(self.recipe, self.backend)
        return fn(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding,
                  **self._key())


class QuantRaggedDot(_QuantOp):
    """Quantized `jax.lax.ragged_dot(lhs [T, K], rhs [E, K, N], group_sizes [E])` for MoE experts."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, precision: Any = None,
                 preferred_element_type: Any = None, impl: str = "xla", **unused: Any) -> jax.Array:
        return ragged_dot(lhs, rhs, group_sizes, self.recipe, preferred_element_type=preferred_element_type,
                          precision=precision, impl=impl, **self._key())


class QuantEinsum(_QuantOp):
    """Quantized two-operand `jnp.einsum` (explicit output): nnx.Einsum(..., einsum_op=QuantEinsum(...))."""

    def __call__(self, subscripts: str, lhs: jax.Array, rhs: jax.Array, *, precision: Any = None,
                 preferred_element_type: Any = None, out_sharding: Any = None, **unused: Any) -> jax.Array:
        fn = einsum(self.recipe, self.backend)
        return fn(subscripts, lhs, rhs, precision=precision, preferred_element_type=preferred_element_type,
                  out_sharding=out_sharding, **self._key())
