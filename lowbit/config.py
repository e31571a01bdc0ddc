"""Run configuration: one flat YAML (MaxText style) split among ModelConfig, DataConfig, TrainConfig.

A config file is a flat mapping of well-named keys (`emb_dim`, `batch_size`, `learning_rate`, ...);
`load_config(name_or_path, overrides)` gives each key to every dataclass that has a field of that
name, applies `key=value` overrides typed like YAML scalars, and checks each value against its
field's type. Unknown keys are an error that names the closest valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lowbit.data import DataConfig
from lowbit.model.config import ModelConfig
from lowbit.resources import shipped_dir


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, checkpointing and parallelism of one run.

    lr(t) = learning_rate * t / warmup_steps for t < warmup_steps, then cosine decay to
    learning_rate * lr_end_ratio at `steps` (optax.warmup_cosine_decay_schedule).
    AdamW weight decay applies to every parameter of rank >= 2 (projection kernels, expert
    weights, the token embedding and lm head) and not to rank-1 ones (RMSNorm scales, biases):
    nanoGPT's rule, which keeps the norm gains from being pulled to zero.
    """

    steps: int = 100
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    lr_end_ratio: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # global-norm clipping; <= 0 turns it off
    # The global batch (DataConfig.batch_size) is split into this many microbatches whose
    # gradients are averaged inside one jitted step (a lax.scan), so one step is one update.
    grad_accum_steps: int = 1
    seed: int = 0
    eval_every: int = 50  # 0: never (besides the end of the run)
    eval_batches: int = 4
    checkpoint_every: int = 100  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    log_every: int = 1
    # A step with a non-finite loss or gradient norm is skipped (params and optimizer state
    # kept); this many in a row stop the run, leaving the last good checkpoint in place.
    max_consecutive_nonfinite: int = 5
    # Mesh axis sizes over all devices; -1 takes the devices left over (at most one axis).
    ici_data: int = 1
    ici_fsdp: int = -1
    ici_expert: int = 1
    backend: str = "auto"  # auto | emulate | fp8 | native (how quantized GEMMs execute)
    compilation_cache_dir: str = ""  # persistent XLA cache (FP8 GEMMs autotune for long); "" = off

    def __post_init__(self) -> None:
        positive = ("steps", "grad_accum_steps", "eval_batches", "keep_checkpoints", "log_every",
                    "max_consecutive_nonfinite")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"TrainConfig.{key} must be > 0, got {getattr(self, key)}")
        non_negative = ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "lr_end_ratio")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ValueError(f"TrainConfig.{key} must be >= 0, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        axes = {k: getattr(self, k) for k in ("ici_data", "ici_fsdp", "ici_expert")}
        if any(v == 0 or v < -1 for v in axes.values()) or list(axes.values()).count(-1) > 1:
            raise ValueError(f"mesh axes must be positive or -1 (fill, at most one axis), got {axes}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")


BACKENDS = ("auto", "emulate", "fp8", "native")
SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig))


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved run configuration: the three sections plus the name it was loaded from."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    name: str = "custom"

    def to_flat(self) -> dict[str, Any]:
        """The flat key -> value mapping a YAML file would hold (round-trips through `from_flat`)."""
        flat: dict[str, Any] = {}
        for section, _ in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat


# locating and listing config files ----------------------------------------------------------------


def config_dir() -> Path:
    """`lowbit/_data/configs` in an installed wheel, else the repository's `configs/`."""
    return shipped_dir("configs")


def list_configs() -> dict[str, str]:
    """Shipped config names -> their one-line description (the YAML's first comment line)."""
    described = {}
    for path in sorted(config_dir().glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        described[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return described


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (`tiny`) or a path to a YAML file -> the file's path."""
    as_path = Path(name_or_path)
    if as_path.suffix in (".yaml", ".yml") or as_path.is_file():
        if not as_path.is_file():
            raise ValueError(f"config file {str(as_path)!r} does not exist")
        return as_path
    shipped = config_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ValueError(f"unknown config {str(name_or_path)!r}; choose one of {sorted(list_configs())} "
                         "or give a path to a .yaml file")
    return shipped


# typing of values --------------------------------------------------------------------------------


def _field_types() -> dict[str, Any]:
    """Every config key -> its annotated type (the first section that declares it)."""
    types_by_key: dict[str, Any] = {}
    for _, cls in SECTIONS:
        for key, hint in typing.get_type_hints(cls).items():
            types_by_key.setdefault(key, hint)
    return types_by_key


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked (and, where lossless, converted) to the field type `hint`.

    YAML 1.1 reads `3e-4` as a string and `2024` as an int: a float field accepts numeric
    strings and ints, a str field accepts any scalar as its text. Everything else must match.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return coerce(key, value, option)
        raise ValueError(f"{key} expects {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value  # a type this loader does not police (none in the shipped dataclasses)
    raise ValueError(f"{key} expects {_type_name(hint)}, got {value!r}")


def _unknown_key_error(key: str, known: Iterable[str]) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; run `python -m lowbit.train --help`"
    return ValueError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """['learning_rate=1e-3', 'num_experts=8'] -> {'learning_rate': '1e-3', 'num_experts': 8}.

    Values are parsed as YAML scalars; typing against the fields happens in `from_flat`.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value (e.g. learning_rate=1e-3)")
        parsed[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return parsed


def from_flat(flat: Mapping[str, Any], name: str = "custom") -> Config:
    """Split a flat mapping among the sections; unknown keys and mistyped values are errors."""
    hints = _field_types()
    for key in flat:
        if key not in hints:
            raise _unknown_key_error(key, hints)
    typed = {key: coerce(key, value, hints[key]) for key, value in flat.items()}
    sections = {}
    for section, cls in SECTIONS:
        names = {f.name for f in dataclasses.fields(cls)}
        sections[section] = cls(**{k: v for k, v in typed.items() if k in names})
    return Config(**sections, name=name)


def load_config(name_or_path: str | Path = "tiny",
                overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """A shipped config name or YAML path, with `key=value` strings or a mapping on top."""
    path = resolve_config_path(name_or_path)
    flat = yaml.safe_load(path.read_text()) or {}
    if not isinstance(flat, dict):
        raise ValueError(f"config file {str(path)!r} must hold a flat mapping of key: value")
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return from_flat({**flat, **extra}, name=path.stem)


def dump_yaml(config: Config, extra: Mapping[str, Any] | None = None) -> str:
    """The resolved config as flat YAML (plus e.g. the recipe), readable by `load_config`."""
    body = {**(extra or {}), **config.to_flat()}
    return yaml.safe_dump(body, sort_keys=False)
