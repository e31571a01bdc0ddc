"""Decoder-only transformer (MaxText-like): embed -> L x [attention, dense MLP or MoE] -> norm -> lm head.

Pre-norm residual layers: x += attn(norm(x)); x += ffn(norm(x)). Module paths follow
docs/architecture.md: token_embedder, layers/<i>/{pre_attention_norm, attention, post_attention_norm,
mlp | moe}, decoder_norm, logits_dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.model.attention import Attention
from lowbit.model.config import ModelConfig
from lowbit.model.layers import MlpBlock, RMSNorm, projection
from lowbit.model.moe import MoeBlock

# nnx.List exists from flax 0.12; older versions hold a plain list of modules as graph nodes.
_ModuleList = getattr(nnx, "List", list)

_ATTENTION_PROJ = ("query_proj", "key_proj", "value_proj", "out_proj")


def remat_policy(name: str) -> Callable[..., bool] | None:
    """jax.checkpoint policy for a config name (MaxText names where they exist).

    full: save nothing, recompute the layer; minimal: save matmuls without batch dims;
    dots_saveable: save every matmul; save_qkv_proj: save q/k/v projections only;
    save_dot_except_mlp: save the attention projections, recompute the (MoE) MLP.
    """
    policies = jax.checkpoint_policies
    table = {
        "full": policies.nothing_saveable,
        "minimal": policies.dots_with_no_batch_dims_saveable,
        "dots_saveable": policies.dots_saveable,
        "save_qkv_proj": policies.save_only_these_names(*_ATTENTION_PROJ[:3]),
        "save_dot_except_mlp": policies.save_only_these_names(*_ATTENTION_PROJ),
    }
    if name == "none":
        return None
    if name not in table:
        raise ValueError(f"unknown remat_policy {name!r}; choose 'none' or one of {sorted(table)}")
    return table[name]


class DecoderLayer(nnx.Module):
    """One pre-norm block; `mlp` (SwiGLU) for dense layers, `moe` for MoE layers."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        eps = cfg.normalization_layer_epsilon
        self.pre_attention_norm = RMSNorm(cfg.emb_dim, epsilon=eps, dtype=dtype)
        self.attention = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.emb_dim, epsilon=eps, dtype=dtype)
        self.is_moe = cfg.layer_is_moe(layer_index)
        if self.is_moe:
            self.moe = MoeBlock(cfg, rngs=rngs)
        else:
            self.mlp = MlpBlock(cfg.emb_dim, cfg.mlp_dim, dtype=dtype, init_scale=cfg.init_scale, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = x + self.attention(self.pre_attention_norm(x), positions)
        hidden = self.post_attention_norm(x)
        if self.is_moe:
            ffn_out, stats = self.moe(hidden)
        else:
            ffn_out, stats = self.mlp(hidden), {}
        return x + ffn_out, stats


def _call_layer(layer: DecoderLayer, x: jax.Array, positions: jax.Array):
    return layer(x, positions)


class Decoder(nnx.Module):
    """tokens int32[B, T] -> (logits f32[B, T, V], aux).

    aux: aux_loss (sum over MoE layers of lb_weight * lb_loss + z_weight * z_loss), expert_load
    f32[num_moe_layers, E] (fraction of routed token-slots per expert), dropped_fraction (mean over
    MoE layers of the fraction of slots dropped by the capacity limit; 0 when dropless).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        self.cfg = cfg
        self.token_embedder = nnx.Embed(
            cfg.vocab_size, cfg.emb_dim, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(stddev=cfg.embedding_init_scale), rngs=rngs)
        self.layers = _ModuleList([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_decoder_layers)])
        self.decoder_norm = RMSNorm(cfg.emb_dim, epsilon=cfg.normalization_layer_epsilon, dtype=dtype)
        if cfg.logits_via_embedding:
            # Tied head: x @ embedding^T via nnx.Embed.attend (not a hookable GEMM).
            self.logits_dense = None
        else:
            self.logits_dense = projection(cfg.emb_dim, cfg.vocab_size, dtype=dtype,
                                           init_scale=cfg.init_scale, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, Any]]:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32[batch, length], got shape {tokens.shape}")
        if positions is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self.token_embedder(tokens)
        policy = remat_policy(cfg.remat_policy)
        call = _call_layer if policy is None else nnx.remat(_call_layer, policy=policy, prevent_cse=True)
        layer_stats = []
        for layer in self.layers:
            x, stats = call(layer, x, positions)
            if stats:
                layer_stats.append(stats)
        x = self.decoder_norm(x)
        if self.logits_dense is None:
            # Tied head: scale by 1/sqrt(emb_dim) (MaxText normalize_embedding_logits) since the
            # embedding has unit-variance rows, unlike a fan_in-scaled kernel.
            logits = self.token_embedder.attend(x) / jnp.sqrt(jnp.asarray(cfg.emb_dim, x.dtype))
        else:
            logits = self.logits_dense(x)
        return logits.astype(jnp.float32), _collect_aux(cfg, layer_stats)


def _collect_aux(cfg: ModelConfig, layer_stats: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    if not layer_stats:
        return {"aux_loss": jnp.zeros((), jnp.float32),
                "expert_load": jnp.zeros((0, cfg.num_experts), jnp.float32),
                "dropped_fraction": jnp.zeros((), jnp.float32)}
    lb = sum(s["lb_loss"] for s in layer_stats)
    z = sum(s["z_loss"] for s in layer_stats)
    return {
        "aux_loss": cfg.load_balance_loss_weight * lb + cfg.router_z_loss_weight * z,
        "expert_load": jnp.stack([s["expert_load"] for s in layer_stats]),
        "dropped_fraction": jnp.mean(jnp.stack([s["dropped_fraction"] for s in layer_stats])),
    }
