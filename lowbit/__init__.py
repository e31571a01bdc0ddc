"""lowbit: block-scaled low-precision (MXFP8, NVFP4, MXFP4, FP8) training for JAX and Flax.

Public API (contract in docs/architecture.md and README): formats, quantize/dequantize/qdq,
Hadamard transforms, quantized dot_general / ragged_dot, recipes and the Flax glue.
"""

from __future__ import annotations

import importlib
from typing import Any

from lowbit.formats import (
    FP8,
    FP8_E5M2,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8,
    MXFP8_E5M2,
    NVFP4,
    Format,
    bytes_per_element,
    get_format,
)
from lowbit.quantize import QArray, dequantize, pack_fp4, qdq, quantize, unpack_fp4

__version__ = "0.1.0"

# Names served from modules further down the layer stack, imported on first use so that
# `import lowbit` stays light (no flax import for users of the numerics alone).
_LAZY = {
    "hadamard": ("lowbit.hadamard", "hadamard"),
    "random_hadamard": ("lowbit.hadamard", "random_hadamard"),
    "inverse_hadamard": ("lowbit.hadamard", "inverse_hadamard"),
    "inverse_random_hadamard": ("lowbit.hadamard", "inverse_random_hadamard"),
    "hadamard_matrix": ("lowbit.hadamard", "hadamard_matrix"),
    "random_signs": ("lowbit.hadamard", "random_signs"),
    "einsum": ("lowbit.dot", "einsum"),
    "PassConfig": ("lowbit.recipes", "PassConfig"),
    "OperandConfig": ("lowbit.recipes", "OperandConfig"),
    "select_backend": ("lowbit.backends", "select_backend"),
    "conversion_report": ("lowbit.nn", "conversion_report"),
    "dot_general": ("lowbit.dot", "dot_general"),
    "ragged_dot": ("lowbit.dot", "ragged_dot"),
    "Recipe": ("lowbit.recipes", "Recipe"),
    "get_recipe": ("lowbit.recipes", "get_recipe"),
    "list_recipes": ("lowbit.recipes", "list_recipes"),
    "quantize_model": ("lowbit.nn", "quantize_model"),
    "set_quantize_impl": ("lowbit.kernels", "set_quantize_impl"),
    "get_quantize_impl": ("lowbit.kernels", "get_quantize_impl"),
    "nn": ("lowbit.nn", None),
    "linen": ("lowbit.linen", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "FP8", "FP8_E5M2", "MXFP4", "MXFP6_E2M3", "MXFP6_E3M2", "MXFP8", "MXFP8_E5M2", "NVFP4",
    "Format", "QArray", "bytes_per_element", "dequantize", "get_format", "pack_fp4", "qdq",
    "quantize", "unpack_fp4", *_LAZY,
]
