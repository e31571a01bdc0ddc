"""Hand-written kernels for hot paths; the XLA reference in lowbit.quantize defines the numerics.

lowbit's GEMMs quantize through `dispatch.quantize`, which picks the fused kernel or the XLA path
per `set_quantize_impl("auto" | "xla" | "fused")` / $LOWBIT_QUANTIZE_IMPL (same bits either way).
"""

from lowbit.kernels.dispatch import (
    QUANTIZE_IMPLS,
    get_quantize_impl,
    quantize_impl,
    set_quantize_impl,
)
from lowbit.kernels.quantize_pallas import fused_available, quantize_fused

__all__ = ["QUANTIZE_IMPLS", "fused_available", "get_quantize_impl", "quantize_fused", "quantize_impl",
           "set_quantize_impl"]
