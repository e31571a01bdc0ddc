"""Flax NNX glue: quantized dot_general / ragged_dot / einsum modules and quantize_model."""

from lowbit.nn.convert import HookInfo, conversion_report, kept_layers, quantize_model
from lowbit.nn.quant_modules import (
    AmaxHistory,
    QuantDotGeneral,
    QuantEinsum,
    QuantRaggedDot,
    update_amax_histories,
)

__all__ = ["AmaxHistory", "HookInfo", "QuantDotGeneral", "QuantEinsum", "QuantRaggedDot", "conversion_report",
           "kept_layers", "quantize_model", "update_amax_histories"]
