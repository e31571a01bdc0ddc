"""Model configuration: MaxText-style key names, validation, analytic parameter and FLOP counts.

`ModelConfig` is a frozen dataclass; build variants with `dataclasses.replace` or
`ModelConfig.from_dict`. `num_params` / `active_params` / `flops_per_token` count the model
analytically (no arrays built), so they work for shapes far too large for this machine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

MOE_IMPLS = ("dropless", "capacity", "pallas")  # pallas: dropless through lowbit.kernels.grouped_pallas
EMBED_GRADS = ("scatter", "gemm")  # the token embedding's table gradient: scatter-add, or one-hot GEMM
REMAT_POLICIES = ("none", "full", "minimal", "dots_saveable", "save_qkv_proj", "save_dot_except_mlp")
ATTENTION_IMPLS = ("auto", None, "xla", "cudnn")
DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of the decoder (MaxText key names).

    `num_experts == 0` is a dense model: every layer has a SwiGLU `mlp` of width `mlp_dim`.
    Otherwise layers `< first_num_dense_layers` are dense and the rest are MoE layers with
    `num_experts` experts of width `moe_mlp_dim` (plus a shared expert of width
    `num_shared_experts * moe_mlp_dim` when `num_shared_experts > 0`, DeepSeek style).
    """

    # vocabulary and sequence
    vocab_size: int = 256
    max_target_length: int = 128
    # widths
    emb_dim: int = 64
    mlp_dim: int = 128
    moe_mlp_dim: int = 128
    # attention
    num_query_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10_000.0
    # jax.nn.dot_product_attention implementation; auto: cuDNN flash attention on a GPU where it applies
    attention_impl: str | None = "auto"
    # depth
    num_decoder_layers: int = 2
    first_num_dense_layers: int = 0
    # mixture of experts
    num_experts: int = 4
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    moe_impl: str = "dropless"
    capacity_factor: float = 1.25
    norm_topk_prob: bool = True
    load_balance_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    # numerics and memory
    dtype: str = "bfloat16"
    remat_policy: str = "none"
    scan_layers: bool = False  # run runs of identical consecutive layers as one lax.scan (compile once)
    logits_via_embedding: bool = False
    # Embedding lookup as one_hot(tokens) @ table (MaxText's use_iota_embed): its gradient is a GEMM
    # instead of a scatter-add, whose atomics serialize on the few hot rows of a small (byte) vocab.
    use_iota_embed: bool = False
    # Without iota: the lookup's table gradient as a scatter-add ("scatter") or a one-hot GEMM ("gemm").
    embed_grad: str = "scatter"
    normalization_layer_epsilon: float = 1e-6
    init_scale: float = 1.0  # variance-scaling factor of every kernel (fan_in, truncated normal)
    embedding_init_scale: float = 1.0  # stddev of the token embedding

    def __post_init__(self) -> None:
        positive = ("vocab_size", "max_target_length", "emb_dim", "num_query_heads", "num_kv_heads",
                    "head_dim", "num_decoder_layers", "num_experts_per_tok")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key} must be > 0, got {getattr(self, key)}")
        non_negative = ("num_experts", "num_shared_experts", "first_num_dense_layers")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ValueError(f"ModelConfig.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_query_heads ({self.num_query_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.first_num_dense_layers > self.num_decoder_layers:
            raise ValueError(
                f"ModelConfig.first_num_dense_layers ({self.first_num_dense_layers}) exceeds "
                f"num_decoder_layers ({self.num_decoder_layers})")
        if self.num_dense_layers > 0 and self.mlp_dim <= 0:
            raise ValueError(f"ModelConfig.mlp_dim must be > 0 for dense layers, got {self.mlp_dim}")
        if self.num_experts > 0:
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(
                    f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                    f"num_experts ({self.num_experts})")
            if self.num_moe_layers > 0 and self.moe_mlp_dim <= 0:
                raise ValueError(f"ModelConfig.moe_mlp_dim must be > 0, got {self.moe_mlp_dim}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"ModelConfig.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.moe_impl == "capacity" and not self.capacity_factor > 0:
            raise ValueError(
                f"ModelConfig.capacity_factor must be > 0 with moe_impl='capacity', "
                f"got {self.capacity_factor}")
        if self.embed_grad not in EMBED_GRADS:
            raise ValueError(f"ModelConfig.embed_grad must be one of {EMBED_GRADS}, got {self.embed_grad!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers must be true or false, got {self.scan_layers!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                f"got {self.attention_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.normalization_layer_epsilon <= 0:
            raise ValueError("ModelConfig.normalization_layer_epsilon must be > 0")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")

    # derived quantities ---------------------------------------------------------------------

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations and GEMM inputs (weights are stored in float32)."""
        return jnp.dtype(self.dtype)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_decoder_layers if self.num_experts == 0 else self.first_num_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_decoder_layers - self.num_dense_layers

    def layer_is_moe(self, layer_index: int) -> bool:
        return self.num_experts > 0 and layer_index >= self.first_num_dense_layers

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a flat mapping (YAML / CLI overrides); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named shapes. tiny: CPU tests. small: ~100M total parameters, one GPU in minutes.
# mixtral-8x7b / llama4-scout: published text-model dims (HF config.json of
# mistralai/Mixtral-8x7B-v0.1 and meta-llama/Llama-4-Scout-17B-16E), for GEMM benchmarks; Llama 4
# details beyond GEMM shapes (QK-norm, NoPE layers, chunked attention, sigmoid top-1 router) are
# not modelled.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, max_target_length=128, emb_dim=64, mlp_dim=128, moe_mlp_dim=128,
                 num_query_heads=4, num_kv_heads=2, head_dim=32, num_decoder_layers=2,
                 num_experts=4, num_experts_per_tok=2),
    "small": dict(vocab_size=256, max_target_length=512, emb_dim=512, mlp_dim=2048, moe_mlp_dim=960,
                  num_query_heads=8, num_kv_heads=4, head_dim=64, num_decoder_layers=8,
                  num_experts=8, num_experts_per_tok=2),
    "mixtral-8x7b": dict(vocab_size=32000, max_target_length=4096, emb_dim=4096, mlp_dim=14336,
                         moe_mlp_dim=14336, num_query_heads=32, num_kv_heads=8, head_dim=128,
                         num_decoder_layers=32, num_experts=8, num_experts_per_tok=2,
                         rope_theta=1_000_000.0, normalization_layer_epsilon=1e-5),
    "llama4-scout": dict(vocab_size=202048, max_target_length=8192, emb_dim=5120, mlp_dim=16384,
                         moe_mlp_dim=8192, num_query_heads=40, num_kv_heads=8, head_dim=128,
                         num_decoder_layers=48, num_experts=16, num_experts_per_tok=1,
                         num_shared_experts=1, rope_theta=500_000.0,
                         normalization_layer_epsilon=1e-5),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`PRESETS`) with keyword overrides, e.g. get_model_config("tiny", dtype="float32")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


# analytic counts ----------------------------------------------------------------------------


def _attention_params(cfg: ModelConfig) -> int:
    q_out = cfg.num_query_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    return cfg.emb_dim * q_out + 2 * cfg.emb_dim * kv_out + q_out * cfg.emb_dim


def _swiglu_params(emb_dim: int, hidden: int) -> int:
    return 3 * emb_dim * hidden


def _moe_params(cfg: ModelConfig, experts_counted: int) -> int:
    router = cfg.emb_dim * cfg.num_experts
    experts = experts_counted * _swiglu_params(cfg.emb_dim, cfg.moe_mlp_dim)
    shared = _swiglu_params(cfg.emb_dim, cfg.num_shared_experts * cfg.moe_mlp_dim)
    return router + experts + shared


def _count(cfg: ModelConfig, experts_counted: int) -> int:
    embed = cfg.vocab_size * cfg.emb_dim
    head = 0 if cfg.logits_via_embedding else cfg.vocab_size * cfg.emb_dim
    norms_per_layer = 2 * cfg.emb_dim
    per_layer = norms_per_layer + _attention_params(cfg)
    dense = cfg.num_dense_layers * (per_layer + _swiglu_params(cfg.emb_dim, cfg.mlp_dim))
    moe = cfg.num_moe_layers * (per_layer + _moe_params(cfg, experts_counted))
    return embed + head + cfg.emb_dim + dense + moe


def num_params(cfg: ModelConfig) -> int:
    """Total parameters (embedding, all experts, norms, lm head unless tied)."""
    return _count(cfg, cfg.num_experts)


def active_params(cfg: ModelConfig) -> int:
    """Parameters touched per token: all but the unselected experts (top-k of E, plus shared)."""
    return _count(cfg, cfg.num_experts_per_tok if cfg.num_experts else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, causal: bool = True) -> float:
    """Forward matmul FLOPs per token: 2 * (active matmul params) + attention score/value BMMs.

    Matmul params exclude the embedding lookup (not a GEMM) and norms; the router is included.
    Attention: QK^T and PV cost 2 * 2 * T * Hq * Dh per token and layer, halved when causal
    (MaxText convention). A training step costs about 3x this (fprop + dgrad + wgrad).
    """
    seq_len = cfg.max_target_length if seq_len is None else seq_len
    matmul_params = active_params(cfg) - cfg.vocab_size * cfg.emb_dim
    matmul_params -= cfg.emb_dim * (2 * cfg.num_decoder_layers + 1)  # norms
    if cfg.logits_via_embedding:
        matmul_params += cfg.vocab_size * cfg.emb_dim  # tied head is still a GEMM
    attention = 4 * seq_len * cfg.num_query_heads * cfg.head_dim * cfg.num_decoder_layers
    if causal:
        attention /= 2
    return 2.0 * matmul_params + attention


def expert_capacity(num_tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert on the capacity path: ceil(tokens * k / E * capacity_factor), at least 1."""
    return max(1, math.ceil(num_tokens * cfg.num_experts_per_tok / cfg.num_experts * cfg.capacity_factor))
