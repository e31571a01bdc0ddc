"""Decoder-only transformer (MaxText-like): embed -> L x [attention, dense MLP or MoE] -> norm -> lm head.

Pre-norm residual layers: x += attn(norm(x)); x += ffn(norm(x)). Module paths follow
docs/architecture.md: token_embedder, layers/<i>/{pre_attention_norm, attention, post_attention_norm,
mlp | moe}, decoder_norm, logits_dense.

`scan_layers` (MaxText's key): consecutive layers with the same NNX graph (same dense/MoE type and
the same GEMM hooks, i.e. the same recipe treatment after `lowbit.quantize_model`) run as one
`jax.lax.scan` over their parameters, stacked inside the step, so a segment compiles once whatever
its length. Parameters stay stored per layer (`layers/<i>`): quantize_model, checkpoints and
sharding rules see the same tree either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lowbit.model.attention import Attention
from lowbit.model.config import EMBED_GRADS, ModelConfig
from lowbit.model.layers import MlpBlock, RMSNorm, projection
from lowbit.model.moe import MoeBlock
from lowbit.model.sharding import constrain_batch

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
        x = constrain_batch(x)  # the residual stream stays split by batch under FSDP
        x = x + self.attention(self.pre_attention_norm(x), positions)
        hidden = self.post_attention_norm(x)
        if self.is_moe:
            ffn_out, stats = self.moe(hidden)
        else:
            ffn_out, stats = self.mlp(hidden), {}
        return x + ffn_out, stats


def _call_layer(layer: DecoderLayer, x: jax.Array, positions: jax.Array):
    return layer(x, positions)


# Stacked along the scan's layer axis: every Variable but the RNG streams (parameters, amax histories).
_PER_LAYER = nnx.Not(nnx.RngState)


def _scan_signature(layer: nnx.Module) -> tuple:
    """What must agree for two layers to share one scan body.

    The graph definition (module types, static attributes, the GEMM hooks and their recipes), the
    shapes/dtypes of the per-layer Variables (to stack them: parameters, and the amax histories of
    delayed scaling), and the identity of every RNG Variable: the body carries one copy of those (the
    shared `quant` RNG stream of quantize_model), so a layer owning its own stream stays out of any segment.
    """
    graphdef, params = nnx.split(layer, _PER_LAYER, ...)[:2]
    shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))
    carried = tuple(id(node) for _, node in nnx.iter_graph(layer) if isinstance(node, nnx.RngState))
    return graphdef, shapes, carried


def layer_segments(layers: Sequence[nnx.Module]) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of consecutive layers with equal `_scan_signature`.

    e.g. dense layer 0, quantized MoE layers 1-5, BF16 MoE layers 6-7 -> [(0, 1), (1, 6), (6, 8)].
    """
    signatures = [_scan_signature(layer) for layer in layers]
    segments, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or signatures[i] != signatures[start]:
            segments.append((start, i))
            start = i
    return segments


def _scan_segment(layers: Sequence[DecoderLayer], x: jax.Array, positions: jax.Array,
                  policy: Callable[..., bool] | None) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """x -> layers[-1](...layers[0](x)) as one lax.scan over the layers' stacked parameters.

    The RNG streams are the scan carry (the rest is stacked), so each iteration draws the keys the
    unrolled loop would draw (the stream's count advances per call): stochastic rounding and
    Hadamard signs differ between layers exactly as without scan. Returns per-layer MoE stats.
    """
    graphdef, _, carried = nnx.split(layers[0], _PER_LAYER, ...)
    # A copy with a leading layer axis (unsharded; each layer's sharding carries over to the
    # trailing axes), made per step: parameters stay stored per layer. Its gradient is sliced back.
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *(nnx.state(layer, _PER_LAYER) for layer in layers))

    def body(carry, params):
        h, state = carry
        layer = nnx.merge(graphdef, params, state)
        h, stats = layer(h, positions)
        return (h, nnx.split(layer, _PER_LAYER, ...)[2]), stats

    if policy is not None:  # remat per layer, as in the unrolled loop; no CSE to fear inside scan
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    (x, carried), stats = jax.lax.scan(body, (x, carried), stacked)
    nnx.update(layers[0], carried)  # the shared Variables (RNG counts) advance as if unrolled
    if not stats:
        return x, []
    return x, [jax.tree.map(lambda s, i=i: s[i], stats) for i in range(len(layers))]


def embed_tokens(embedder: nnx.Embed, tokens: jax.Array, iota: bool, grad: str = "scatter") -> jax.Array:
    """table[tokens]; with `iota`, one_hot(tokens, V) @ table (exact: one nonzero term per output).

    The gather's gradient is a scatter-add into the table: in bf16 it took 123 of the 140 ms of a
    `small` (byte vocab) training step on real text; the one-hot form's gradient is a [V, N] x [N, D] GEMM.
    grad="gemm" keeps the gather forward and makes only its gradient that GEMM (in chunks of the token
    axis, so the one-hot block stays <= max(2^27, batch * V) elements): for large vocabularies, where a
    one-hot forward costs a full GEMM. moe-1.8b bf16 step on an H100: 167.1 -> 156.9 ms on real text,
    158.7 -> 161.8 on random tokens.
    Out-of-range tokens give a zero row with `iota` (jnp.take's default fill gives NaN) and no gradient.
    grad="scatter" gathers the float32 rows and then casts them (the values of nnx.Embed's cast-then-gather),
    so the scatter-add accumulates in float32. On an H200 at 8x2048 tokens, V=32768 (Zipfian ids): 0.18 ms,
    against 12.4 ms for the bf16 scatter (off by 9% of the largest row) and 3.9 ms for the GEMM
    (tools/bench_embed_grad.py, docs/benchmarks.md).
    """
    if grad not in EMBED_GRADS:
        raise ValueError(f"embedding gradient must be one of {EMBED_GRADS}, got {grad!r}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if tokens.dtype.itemsize < 4:  # int8/uint8 ids would overflow in ids + V (wrap) and in one_hot's iota
        tokens = tokens.astype(jnp.int32)
    table = embedder.embedding[...]
    if not iota and grad == "scatter":
        return jnp.take(table, tokens, axis=0).astype(embedder.dtype or table.dtype)
    table = table.astype(embedder.dtype or table.dtype)
    if not iota:
        return _gather_with_gemm_grad(table, tokens)
    return jnp.dot(jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype), table)


_EMBED_GRAD_CHUNK = 4096  # tokens per one-hot block of the gradient GEMM, at most
_EMBED_GRAD_BLOCK = 1 << 27  # one-hot elements per block, at most (256 MB in bf16)


@jax.custom_vjp
def _gather_with_gemm_grad(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """jnp.take(table, tokens, axis=0), whose table gradient is sum_chunks one_hot(chunk)ᵀ · dy(chunk)."""
    return jnp.take(table, tokens, axis=0)


def _gather_fwd(table, tokens):
    return jnp.take(table, tokens, axis=0), (tokens, jnp.zeros((table.shape[0], 0), table.dtype))


def _gather_bwd(residuals, dy):
    """Chunks run along the last token axis only, so a batch sharded over devices (FSDP) stays sharded:
    each chunk contracts (batch, chunk) in one GEMM and no device gathers another's ids or dy."""
    tokens, empty = residuals  # empty [V, 0]: the table's vocabulary size and dtype, no data
    vocab, width = empty.shape[0], dy.shape[-1]
    if tokens.size == 0:
        return jnp.zeros((vocab, width), empty.dtype), None
    ids = tokens.reshape(-1, tokens.shape[-1]) if tokens.ndim else tokens.reshape(1, 1)
    ids = jnp.where(ids < 0, ids + vocab, ids)  # jnp.take wraps negative ids; ids still < 0 or >= V: no row
    batch, length = ids.shape
    rows = dy.reshape(batch, length, width)
    tokens_per_chunk = min(_EMBED_GRAD_CHUNK, max(1, _EMBED_GRAD_BLOCK // vocab))
    chunk = min(length, max(1, tokens_per_chunk // batch))
    pad = -length % chunk  # padded ids are -1: an all-zero one-hot row
    ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1).reshape(batch, -1, chunk)
    rows = jnp.pad(rows, ((0, 0), (0, pad), (0, 0))).reshape(batch, -1, chunk, width)

    def add_chunk(acc, chunk_in):
        chunk_ids, chunk_rows = chunk_in  # [B, chunk], [B, chunk, D]
        one_hot = jax.nn.one_hot(chunk_ids, vocab, dtype=chunk_rows.dtype)  # [B, chunk, V]
        return acc + lax.dot_general(one_hot, chunk_rows, (((0, 1), (0, 1)), ((), ())),
                                     preferred_element_type=jnp.float32), None

    grad, _ = lax.scan(add_chunk, jnp.zeros((vocab, width), jnp.float32),
                       (jnp.moveaxis(ids, 1, 0), jnp.moveaxis(rows, 1, 0)))
    return grad.astype(empty.dtype), None


_gather_with_gemm_grad.defvjp(_gather_fwd, _gather_bwd)


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
        x = embed_tokens(self.token_embedder, tokens, cfg.use_iota_embed, cfg.embed_grad)
        policy = remat_policy(cfg.remat_policy)
        call = _call_layer if policy is None else nnx.remat(_call_layer, policy=policy, prevent_cse=True)
        layer_stats = []
        unrolled = [(i, i + 1) for i in range(len(self.layers))]
        for start, stop in layer_segments(self.layers) if cfg.scan_layers else unrolled:
            if stop - start == 1:
                x, stats = call(self.layers[start], x, positions)
                segment_stats = [stats] if stats else []
            else:
                x, segment_stats = _scan_segment(list(self.layers[start:stop]), x, positions, policy)
            layer_stats.extend(segment_stats)
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
