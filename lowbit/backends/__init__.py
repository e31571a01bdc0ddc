"""How a quantized GEMM executes: `emulate` (anywhere), `fp8` (Hopper FP8), `native` (Blackwell).

Every backend exposes `gemm(lhs, rhs, *, out_dtype, compute_dtype, precision)` on the canonical
"TN" form lhs [B, M, K] x rhs [B, N, K] -> [B, M, N], operands quantized along K (or unquantized).
`select_backend` picks one from the recipe and the device; impossible choices are errors, never a
silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lowbit.backends import emulate, fp8, native
from lowbit.formats import get_format

BACKEND_NAMES = ("emulate", "fp8", "native")
_GEMMS: dict[str, Callable[..., jax.Array]] = {
    "emulate": emulate.gemm, "fp8": fp8.gemm, "native": native.gemm,
}


def get_gemm(name: str) -> Callable[..., jax.Array]:
    if name not in _GEMMS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} (or 'auto')")
    return _GEMMS[name]


def device_info(device: Any = None) -> tuple[str, float | None]:
    """(platform, compute capability as a float or None) of `device` (default: jax.devices()[0])."""
    device = jax.devices()[0] if device is None else device
    cc = getattr(device, "compute_capability", None)
    try:
        return device.platform, (float(cc) if cc else None)
    except (TypeError, ValueError):  # not a CUDA "major.minor" (ROCm reports e.g. "gfx90a")
        return device.platform, None


def _quantized_formats(recipe: Any) -> set[str]:
    return {op.format for pc in recipe.passes.values() for op in (pc.lhs, pc.rhs) if op.format}


def _mixed_passes(recipe: Any) -> list[str]:
    """Passes with one quantized and one high-precision operand (only emulate multiplies those)."""
    return [p for p, pc in recipe.passes.items() if pc.lhs.quantized != pc.rhs.quantized]


def check_backend(recipe: Any, name: str, platform: str, cc: float | None) -> None:
    """Raise ValueError if backend `name` cannot run `recipe` on this device."""
    formats = _quantized_formats(recipe)
    mixed = _mixed_passes(recipe)
    if name == "emulate":
        return
    if mixed:
        raise ValueError(f"backend {name!r} needs both operands of a GEMM quantized or neither; recipe "
                         f"{recipe.name!r} mixes them in {mixed}. Use backend 'emulate'")
    if name == "fp8":
        block_scaled = sorted(f for f in formats if get_format(f).kind != "tensor")
        if block_scaled:
            raise ValueError(f"backend 'fp8' runs per-tensor FP8 only; recipe {recipe.name!r} uses "
                             f"{block_scaled}. Use backend 'emulate' (or 'native' on compute "
                             "capability >= 10)")
        return
    if name == "native":
        if platform != "gpu" or cc is None or cc < 10:
            where = f"compute capability {cc}" if cc else f"platform {platform!r}"
            raise ValueError(f"backend 'native' (cuDNN block-scaled GEMM) needs an NVIDIA GPU with compute "
                             f"capability >= 10 (Blackwell); this device is {where}. Use 'emulate' or 'fp8'")
        unsupported = sorted(formats - set(native.NATIVE_FORMATS))
        if unsupported:
            why = "".join(f" ({native.NOT_NATIVE[f]})" for f in unsupported if f in native.NOT_NATIVE)
            raise ValueError(f"backend 'native' supports {native.NATIVE_FORMATS}; recipe {recipe.name!r} "
                             f"uses {unsupported}{why}. Use backend 'emulate'")
        return
    get_gemm(name)  # raises for unknown names


def select_backend(recipe: Any, platform: str | None = None, compute_capability: float | None = None,
                   override: str | None = None) -> str:
    """Backend name for `recipe` on this device: `override` (e.g. a CLI flag) > recipe.backend > auto.

    auto: cc >= 10 with MX/NVFP4 -> native; GPU with per-tensor FP8 only -> fp8; else emulate.
    """
    if platform is None:
        platform, detected_cc = device_info()
        compute_capability = detected_cc if compute_capability is None else compute_capability
    platform = "gpu" if platform in ("cuda", "rocm", "gpu") else platform
    requested = override if override not in (None, "auto") else recipe.backend
    if requested != "auto":
        check_backend(recipe, requested, platform, compute_capability)
        return requested
    formats = _quantized_formats(recipe)
    if not formats or _mixed_passes(recipe) or platform != "gpu" or compute_capability is None:
        return "emulate"
    if all(get_format(f).kind == "tensor" for f in formats) and compute_capability >= 8.9:
        return "fp8"
    if compute_capability >= 10 and formats <= set(native.NATIVE_FORMATS):
        return "native"
    return "emulate"


__all__ = ["BACKEND_NAMES", "check_backend", "device_info", "emulate", "fp8", "get_gemm", "native",
           "select_backend"]
