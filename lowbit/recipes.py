"""Recipes: named, YAML-backed choices of format, rounding and transforms per GEMM pass.

A linear layer is three GEMMs (DESIGN "Numerics"): fprop Y = X·W, dgrad dX = dY·Wᵀ, wgrad dW = Xᵀ·dY.
Each `PassConfig` says how that GEMM's two operands are quantized (blocks along its contraction
axis) and whether a random Hadamard transform is applied first; a `Recipe` bundles the three passes
with the layers kept in high precision. Shipped recipes live in `recipes/*.yaml`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lowbit.formats import FORMATS, get_format
from lowbit.quantize import ROUNDINGS, SCALE_MODES
from lowbit.resources import shipped_dir
from lowbit.scaling import AMAX_ALGOS

BACKENDS = ("auto", "emulate", "fp8", "native")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
SCALINGS = ("current", "delayed")
PASSES = ("fprop", "dgrad", "wgrad")
# Which tensor each pass's operands hold (for messages and docs).
PASS_OPERANDS = {"fprop": ("X", "W"), "dgrad": ("dY", "W"), "wgrad": ("X", "dY")}


def _fail(where: str, key: str, value: Any, allowed: Any) -> None:
    raise ValueError(f"{where}: invalid value {value!r} for {key!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class OperandConfig:
    """How one GEMM operand is quantized: `format` None keeps it in high precision.

    rounding: "nearest" (RNE) | "stochastic" (SR); scale_mode: MX "floor" (OCP) | "rceil" (NVIDIA);
    block_2d: square block x block tiles (NVFP4 weights: 16x16, so W and Wᵀ share scales);
    prescale: multiply scaled values before rounding (Tseng et al.: 3/4 so SR never clips).
    """

    format: str | None = None
    rounding: str = "nearest"
    scale_mode: str = "floor"
    block_2d: bool = False
    prescale: float = 1.0

    def __post_init__(self) -> None:
        where = "OperandConfig"
        if self.format is not None:
            if not isinstance(self.format, str) or self.format.lower().replace("-", "_") not in FORMATS:
                _fail(where, "format", self.format, [None, *FORMATS])
            object.__setattr__(self, "format", self.format.lower().replace("-", "_"))
        if self.rounding not in ROUNDINGS:
            _fail(where, "rounding", self.rounding, ROUNDINGS)
        if self.scale_mode not in SCALE_MODES:
            _fail(where, "scale_mode", self.scale_mode, SCALE_MODES)
        if not isinstance(self.block_2d, bool):
            _fail(where, "block_2d", self.block_2d, (True, False))
        if isinstance(self.prescale, bool) or not isinstance(self.prescale, int | float) or not (
            0 < self.prescale <= 1
        ):
            _fail(where, "prescale", self.prescale, "a number in (0, 1]")
        object.__setattr__(self, "prescale", float(self.prescale))
        if self.block_2d and (self.format is None or get_format(self.format).block_size == 0):
            raise ValueError(
                f"{where}: block_2d=True needs a block-scaled format (mxfp*, nvfp4), got {self.format!r}"
            )

    @property
    def quantized(self) -> bool:
        return self.format is not None

    @property
    def stochastic(self) -> bool:
        return self.quantized and self.rounding == "stochastic"

    def __str__(self) -> str:
        if self.format is None:
            return "bf16"
        parts = [self.format]
        if self.block_2d:
            parts.append("2d")
        if self.rounding == "stochastic":
            parts.append("SR")
        if get_format(self.format).kind == "mx":
            parts.append(self.scale_mode)
        if self.prescale != 1.0:
            parts.append(f"x{self.prescale:g}")
        return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """One GEMM's operands (lhs, rhs; see PASS_OPERANDS) and its random Hadamard transform.

    hadamard_block b: both operands are multiplied by the same orthonormal H_b·diag(s) along the
    contraction axis before quantization, (A S H)(Hᵀ S B) = A·B; s is fresh per call.
    """

    lhs: OperandConfig = OperandConfig()
    rhs: OperandConfig = OperandConfig()
    hadamard_block: int | None = None

    def __post_init__(self) -> None:
        b = self.hadamard_block
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1)
        ):
            _fail("PassConfig", "hadamard_block", b, "null or a power of two >= 2")

    @property
    def quantized(self) -> bool:
        return self.lhs.quantized or self.rhs.quantized

    @property
    def needs_rng(self) -> bool:
        return self.hadamard_block is not None or self.lhs.stochastic or self.rhs.stochastic

    def __str__(self) -> str:
        rht = f" +RHT{self.hadamard_block}" if self.hadamard_block else ""
        return f"{self.lhs} x {self.rhs}{rht}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-pass quantization of every converted GEMM, plus the layers kept in high precision.

    high_precision_rules: regexes on module paths ("layers/3/moe/router") left unquantized;
    keep_last_fraction: the last ceil(f·L) decoder layers (`layers/<i>/`) stay high precision.
    scaling: per-tensor (FP8) scales from this tensor's amax ("current") or from an amax history of
    `amax_history_len` steps ("delayed", lowbit.scaling; reduced by `amax_compute_algo`).
    A Recipe is hashable, so it can be a static jit argument.
    """

    name: str
    description: str = ""
    fprop: PassConfig = PassConfig()
    dgrad: PassConfig = PassConfig()
    wgrad: PassConfig = PassConfig()
    high_precision_rules: tuple[str, ...] = ()
    keep_last_fraction: float = 0.0
    backend: str = "auto"
    compute_dtype: str = "bfloat16"
    scaling: str = "current"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"

    def __post_init__(self) -> None:
        where = f"Recipe {self.name!r}"
        for p in PASSES:
            if not isinstance(getattr(self, p), PassConfig):
                _fail(where, p, getattr(self, p), "a PassConfig")
        rules = self.high_precision_rules
        if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
            _fail(where, "high_precision_rules", rules, "a list of regex strings")
        object.__setattr__(self, "high_precision_rules", tuple(rules))
        for rule in rules:
            try:
                re.compile(rule)
            except re.error as e:
                raise ValueError(f"{where}: high_precision_rules entry {rule!r} is not a regex: {e}") from e
        f = self.keep_last_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f < 1:
            _fail(where, "keep_last_fraction", f, "a number in [0, 1)")
        object.__setattr__(self, "keep_last_fraction", float(f))
        if self.backend not in BACKENDS:
            _fail(where, "backend", self.backend, BACKENDS)
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail(where, "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        self._check_scaling(where)

    def _check_scaling(self, where: str) -> None:
        if self.scaling not in SCALINGS:
            _fail(where, "scaling", self.scaling, SCALINGS)
        n = self.amax_history_len
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail(where, "amax_history_len", n, "an integer >= 1")
        if self.amax_compute_algo not in AMAX_ALGOS:
            _fail(where, "amax_compute_algo", self.amax_compute_algo, AMAX_ALGOS)
        if self.scaling != "delayed":
            return
        tensor_passes = [p for p, pc in self.passes.items() for op in (pc.lhs, pc.rhs)
                         if op.quantized and get_format(op.format).kind == "tensor"]
        if not tensor_passes:
            raise ValueError(f"{where}: scaling 'delayed' applies to per-tensor formats (fp8, fp8_e5m2) and "
                             "no operand uses one; block-scaled formats take their scales from each block, "
                             "so use scaling: current")
        for p in tensor_passes:
            if self.passes[p].hadamard_block is not None:
                raise ValueError(f"{where}: pass {p!r} has a random Hadamard transform and a per-tensor "
                                 "operand; delayed scaling records the amax of the tensor itself, so drop "
                                 "hadamard_block there or use scaling: current")

    # ----------------------------------------------------------------- queries
    @property
    def passes(self) -> dict[str, PassConfig]:
        return {p: getattr(self, p) for p in PASSES}

    @property
    def quantized(self) -> bool:
        """False for a pure high-precision recipe (then dot_general is lax.dot_general)."""
        return any(pc.quantized for pc in self.passes.values())

    @property
    def delayed(self) -> bool:
        """True if per-tensor scales come from amax histories (state the caller carries)."""
        return self.quantized and self.scaling == "delayed"

    @property
    def needs_rng(self) -> bool:
        """True if any pass uses stochastic rounding or a random Hadamard transform."""
        return any(pc.needs_rng for pc in self.passes.values())

    @property
    def formats(self) -> frozenset[str]:
        return frozenset(
            op.format for pc in self.passes.values() for op in (pc.lhs, pc.rhs) if op.format
        )

    @property
    def headline(self) -> str:
        """The description shortened to one line (for listings and error messages)."""
        return textwrap.shorten(self.description, 110, placeholder=" ...")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with fields replaced (dataclasses.replace); validation runs again."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        lines = [f"Recipe {self.name}: {self.headline}"]
        for p, pc in self.passes.items():
            lhs, rhs = PASS_OPERANDS[p]
            lines.append(f"  {p}: {lhs}={pc.lhs}  {rhs}={pc.rhs}" + (
                f"  RHT{pc.hadamard_block}" if pc.hadamard_block else ""))
        lines.append(f"  high precision: {list(self.high_precision_rules)}, "
                     f"last {self.keep_last_fraction:g} of layers; backend {self.backend}")
        if self.delayed:
            lines.append(f"  delayed scaling: {self.amax_compute_algo} of the last {self.amax_history_len} "
                         "amaxes")
        return "\n".join(lines)

    # ----------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["high_precision_rules"] = list(self.high_precision_rules)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Strict: unknown keys or bad values raise ValueError naming the key and allowed values."""
        data = dict(_check_keys(data, cls, where))
        for p in PASSES:
            if p in data:
                data[p] = _pass_from_dict(data[p], f"{where}.{p}")
        if "high_precision_rules" in data:
            rules = data["high_precision_rules"] or ()
            if isinstance(rules, str) or not isinstance(rules, list | tuple):
                _fail(where, "high_precision_rules", rules, "a list of regex strings")
            data["high_precision_rules"] = tuple(rules)
        if "name" not in data:
            raise ValueError(f"{where}: missing required key 'name'")
        if data.get("description") is None:
            data["description"] = ""
        data["description"] = str(data["description"]).strip()
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a recipe YAML must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, where=str(path))


def _check_keys(data: Any, cls: type, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {_field_names(cls)}, got {data!r}")
    unknown = [k for k in data if k not in _field_names(cls)]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {_field_names(cls)}")
    return data


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _pass_from_dict(data: Any, where: str) -> PassConfig:
    data = dict(_check_keys(data if data is not None else {}, PassConfig, where))
    for side in ("lhs", "rhs"):
        if side in data:
            op = dict(_check_keys(data[side] if data[side] is not None else {}, OperandConfig,
                                  f"{where}.{side}"))
            try:
                data[side] = OperandConfig(**op)
            except ValueError as e:
                raise ValueError(f"{where}.{side}: {e}") from e
    try:
        return PassConfig(**data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


# --------------------------------------------------------------------- shipped recipes
def recipes_dir() -> Path:
    """`lowbit/_data/recipes` in an installed wheel, else `<repo>/recipes` next to the package."""
    return shipped_dir("recipes")


@functools.cache
def _shipped() -> dict[str, Recipe]:
    found = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        recipe = Recipe.from_yaml(path)
        found[recipe.name] = recipe
    return found


def list_recipes() -> list[str]:
    """Names of the shipped recipes (recipes/*.yaml)."""
    return sorted(_shipped())


def get_recipe(name: str | Recipe) -> Recipe:
    """A shipped recipe by name (case-insensitive), a YAML path, or a Recipe passed through."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"get_recipe expects a recipe name, a YAML path or a Recipe, got {type(name).__name__}"
        )
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Recipe.from_yaml(name)
    shipped = _shipped()
    key = name.lower().replace("_", "-")
    if key not in shipped:
        known = "\n".join(f"  {n}: {r.headline}" for n, r in shipped.items())
        raise ValueError(f"unknown recipe {name!r}; known recipes:\n{known}\n(or pass a path to a YAML file)")
    return shipped[key]
