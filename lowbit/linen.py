"""Flax Linen glue: a dot_general_cls for nn.Dense / nn.DenseGeneral whose GEMMs are quantized.

nn.Dense(features, dot_general_cls=functools.partial(lowbit.linen.QuantDotGeneral, recipe="mxfp8"));
recipes with stochastic rounding or RHT draw a fresh key per call from `self.make_rng("quant")`,
so pass rngs={"quant": key} to init/apply. Delayed scaling keeps the amax history in the collection
"_overwrite_with_gradient" (Flax fp8_ops' convention): differentiate with respect to it as well, and
flax.training.train_state.TrainState.apply_gradients stores its gradient as its new value.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from lowbit.dot import dot_general
from lowbit.recipes import Recipe, get_recipe
from lowbit.scaling import init_history

OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"


class QuantDotGeneral(nn.Module):
    """Callable with jax.lax.dot_general's signature; quantizes fprop/dgrad/wgrad per `recipe`."""

    recipe: Recipe | str = "bf16"
    backend: str | None = None

    @nn.compact
    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                 preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
        recipe = get_recipe(self.recipe)
        kwargs = {}
        if recipe.needs_rng:
            if not self.has_rng("quant"):
                raise ValueError(
                    f"recipe {recipe.name!r} needs fresh random bits: pass rngs={{'quant': key}} "
                    "(a new key every step) to init/apply"
                )
            kwargs["key"] = self.make_rng("quant")
        if recipe.delayed:
            history = self.variable(OVERWRITE_WITH_GRADIENT, "amax_history", init_history,
                                    recipe.amax_history_len)
            kwargs["amax_history"] = history.value
        return dot_general(recipe, self.backend)(lhs, rhs, dimension_numbers, precision,
                                                 preferred_element_type, out_sharding, **kwargs)
