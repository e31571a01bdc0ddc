"""Hand-written kernels for hot paths (opt-in; the XLA reference in lowbit.quantize defines the numerics)."""

from lowbit.kernels.quantize_pallas import fused_available, quantize_fused

__all__ = ["fused_available", "quantize_fused"]
