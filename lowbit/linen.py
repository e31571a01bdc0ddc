"""Flax Linen glue: a dot_general_cls for nn.Dense / nn.DenseGeneral whose GEMMs are quantized.

nn.Dense(features, dot_general_cls=functools.partial(lowbit.linen.QuantDotGeneral, recipe="mxfp8"));
recipes with stochastic rounding or RHT draw a fresh key per call from `self.make_rng("quant")`,
so pass rngs={"quant": key} to init/apply.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from lowbit.dot import dot_general
from lowbit.recipes import Recipe, get_recipe


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
        return dot_general(recipe, self.backend)(lhs, rhs, dimension_numbers, precision,
                                                 preferred_element_type, out_sharding, **kwargs)
