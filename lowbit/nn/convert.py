"""quantize_model: swap the GEMM hooks of an existing NNX model for quantized ones, by module path.

Hooks (docs/architecture.md): a callable attribute `dot_general` (nnx.Linear, nnx.LinearGeneral,
custom modules), `einsum_op` (nnx.Einsum) and `ragged_dot` (grouped expert GEMMs). A module whose
path ("layers/3/moe/router") matches a high-precision rule, or that sits in the last
keep_last_fraction of `layers/<i>`, keeps its hooks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Sequence

from flax import nnx

from lowbit.nn.quant_modules import QuantDotGeneral, QuantEinsum, QuantRaggedDot, _QuantOp
from lowbit.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)

_HOOKS = {"dot_general": QuantDotGeneral, "einsum_op": QuantEinsum, "ragged_dot": QuantRaggedDot}
# nnx.data (flax >= 0.12) marks an attribute as graph data; older versions infer it.
_as_data = getattr(nnx, "data", lambda value: value)
_LAYER_INDEX = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)")


@dataclasses.dataclass(frozen=True)
class HookInfo:
    """One GEMM hook of a model: where it is and which recipe runs it (None: high precision)."""

    path: str
    attribute: str
    recipe: str | None
    reason: str = ""


def _path_str(path: Sequence[object]) -> str:
    return "/".join(str(p) for p in path)


def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    seen, found = set(), []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and not isinstance(node, _QuantOp) and id(node) not in seen:
            seen.add(id(node))
            found.append((_path_str(path), node))
    return found


def kept_layers(paths: Iterable[str], keep_last_fraction: float) -> set[int]:
    """Indices i of the last ceil(f·L) decoder layers `layers/<i>` (L = number of layer indices)."""
    indices = {int(m.group(1)) for p in paths if (m := _LAYER_INDEX.search(p))}
    if not indices or keep_last_fraction <= 0:
        return set()
    num_layers = max(indices) + 1
    return set(range(num_layers - math.ceil(keep_last_fraction * num_layers), num_layers))


def _skip_reason(path: str, rules: Sequence[str], kept: set[int]) -> str:
    for rule in rules:
        if re.search(rule, path):
            return f"rule {rule!r}"
    m = _LAYER_INDEX.search(path)
    if m and int(m.group(1)) in kept:
        return "keep_last_fraction"
    return ""


def quantize_model(model: nnx.Module, recipe: Recipe | str, rules: Sequence[str] | None = None,
                   rngs: nnx.Rngs | None = None, backend: str | None = None) -> nnx.Module:
    """Replace the model's dot_general / einsum_op / ragged_dot hooks with quantized modules, in place.

    Skips paths matching recipe.high_precision_rules + rules (re.search) and the last
    keep_last_fraction of `layers/<i>`. `rngs` (with a `quant` stream) is needed when the recipe
    uses stochastic rounding or RHT. Returns the model; `conversion_report(model)` lists the hooks.
    """
    recipe = get_recipe(recipe)
    all_rules = tuple(recipe.high_precision_rules) + tuple(rules or ())
    for rule in all_rules:
        re.compile(rule)
    modules = _modules(model)
    kept = kept_layers((p for p, _ in modules), recipe.keep_last_fraction)
    converted, skipped = 0, 0
    for path, module in modules:
        hooks = [a for a in _HOOKS if callable(getattr(module, a, None))]
        if not hooks:
            continue
        if _skip_reason(path, all_rules, kept):
            skipped += len(hooks)
            continue
        for attribute in hooks:
            if attribute == "dot_general" and getattr(module, "dot_general_cls", None) is not None:
                module.dot_general_cls = None  # it would take precedence over dot_general
            hook = _HOOKS[attribute](recipe, rngs=rngs, backend=backend)
            # The original hook (a function) was a static attribute; the module is graph data.
            setattr(module, attribute, _as_data(hook))
            converted += 1
    logger.info("quantize_model(%s): %d GEMM hooks quantized, %d kept in high precision",
                recipe.name, converted, skipped)
    return model


def conversion_report(model: nnx.Module, recipe: Recipe | str | None = None,
                      rules: Sequence[str] | None = None) -> list[HookInfo]:
    """Every GEMM hook of the model with the recipe that runs it (None: high precision).

    With `recipe` (and `rules`), unquantized hooks also carry the reason they are skipped.
    """
    recipe = None if recipe is None else get_recipe(recipe)
    all_rules = () if recipe is None else tuple(recipe.high_precision_rules) + tuple(rules or ())
    modules = _modules(model)
    kept = kept_layers((p for p, _ in modules), recipe.keep_last_fraction if recipe else 0.0)
    report = []
    for path, module in modules:
        for attribute in _HOOKS:
            hook = getattr(module, attribute, None)
            if isinstance(hook, _QuantOp):
                report.append(HookInfo(path, attribute, hook.recipe.name))
            elif callable(hook):
                report.append(HookInfo(path, attribute, None, _skip_reason(path, all_rules, kept)))
    return report
