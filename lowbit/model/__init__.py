"""MaxText-like decoder-only transformer with Mixture-of-Experts in Flax NNX.

`Decoder(cfg, rngs=nnx.Rngs(params=0, quant=1))(tokens) -> (logits, aux)`. The model holds no
quantization code: `lowbit.quantize_model` swaps its `dot_general` / `ragged_dot` hooks afterwards.
"""

from lowbit.model.attention import Attention
from lowbit.model.config import (
    PRESETS,
    ModelConfig,
    active_params,
    expert_capacity,
    flops_per_token,
    get_model_config,
    num_params,
)
from lowbit.model.decoder import Decoder, DecoderLayer, layer_segments, remat_policy
from lowbit.model.layers import MlpBlock, RMSNorm, apply_rope
from lowbit.model.moe import (
    MoeBlock,
    MoeExperts,
    load_balance_loss,
    route,
    router_z_loss,
)

__all__ = [
    "PRESETS", "Attention", "Decoder", "DecoderLayer", "MlpBlock", "ModelConfig", "MoeBlock", "MoeExperts",
    "RMSNorm", "active_params", "apply_rope", "expert_capacity", "flops_per_token", "get_model_config",
    "layer_segments", "load_balance_loss", "num_params", "remat_policy", "route", "router_z_loss",
]
