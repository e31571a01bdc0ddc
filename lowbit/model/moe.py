"""Mixture-of-Experts feed-forward: float32 router, top-k gating, auxiliary losses, two expert paths.

* dropless (`moe_impl="dropless"`): token slots sorted by expert, three grouped GEMMs through
  `MoeExperts.ragged_dot(x_sorted[T*k, K], w[E, K, N], group_sizes[E])`; nothing is dropped.
* capacity (`moe_impl="capacity"`): each sequence's slots scattered into an [E, C, K] buffer with
  C = ceil(T * k / E * capacity_factor) for its T tokens (MaxText's per-sequence capacity), batched
  GEMMs through `MoeExperts.dot_general` over the expert batch axis on all sequences' buffers; slots
  beyond an expert's capacity in their sequence are dropped (zero expert output).
* pallas (`moe_impl="pallas"`): dropless, with the unquantized ragged_dot hook set to
  lowbit.kernels.grouped_pallas.grouped_matmul (one kernel launch); a hook that quantize_model
  swapped in (an nnx.Module) is called with impl="pallas", so quantized GEMMs run on it too.

Both hooks are plain attributes so that `lowbit.quantize_model` can swap them; this module never
imports lowbit's quantization code.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lowbit.model.config import ModelConfig, expert_capacity
from lowbit.model.layers import MlpBlock, kernel_init

# dot_general dimension numbers of the capacity path: [E, C, K] x [E, K, N] -> [E, C, N].
EXPERT_BATCHED_DIMS = (((2,), (1,)), ((0,), (0,)))
# The capacity path's slot axis (the expert weight gradient's contraction) is padded to a multiple of
# this: the widest block a recipe quantizes along it (mxfp4's 64-wide random Hadamard transform).
SLOT_ALIGN = 64


# routing and auxiliary losses (pure functions) ----------------------------------------------


def route(router_logits: jax.Array, num_experts_per_tok: int,
          norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing: p = softmax(logits); pick the k largest p; gates = p_topk / sum(p_topk) if norm.

    Returns (gates f32[N, k], expert_index int32[N, k], probs f32[N, E]).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    topk_probs, expert_index = jax.lax.top_k(probs, num_experts_per_tok)
    if norm_topk_prob:
        topk_probs = topk_probs / jnp.sum(topk_probs, axis=-1, keepdims=True)
    return topk_probs, expert_index.astype(jnp.int32), probs


def expert_load(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """f_e: fraction of the N*k routed token-slots that chose expert e (sums to 1)."""
    counts = jnp.bincount(expert_index.reshape(-1), length=num_experts)
    return counts.astype(jnp.float32) / expert_index.size


def load_balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4; f_e over the k slots, P_e = mean router prob).

    Equals 1 for perfectly uniform routing, grows as routing concentrates (max E for one expert).
    MaxText's variant counts f_e per token (sums to k), i.e. k times this value.
    """
    num_experts = probs.shape[-1]
    mean_prob = jnp.mean(probs, axis=0)
    return num_experts * jnp.sum(jax.lax.stop_gradient(expert_load(expert_index, num_experts)) * mean_prob)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)))


# experts --------------------------------------------------------------------------------------


class MoeExperts(nnx.Module):
    """E SwiGLU experts: y_e(x) = (silu(x W0_e) * (x W1_e)) Wo_e, weights stacked on axis 0.

    Hooks: `ragged_dot` (grouped GEMM, dropless path) and `dot_general` (expert-batched GEMM,
    capacity path). Weights: wi_0, wi_1 f32[E, emb, mlp]; wo f32[E, mlp, emb] (in, out) per expert.
    """

    def __init__(self, num_experts: int, emb_dim: int, mlp_dim: int, *, dtype: Any, init_scale: float,
                 rngs: nnx.Rngs):
        init = kernel_init(init_scale, batch_axis=(0,))
        self.wi_0 = nnx.Param(init(rngs.params(), (num_experts, emb_dim, mlp_dim), jnp.float32))
        self.wi_1 = nnx.Param(init(rngs.params(), (num_experts, emb_dim, mlp_dim), jnp.float32))
        self.wo = nnx.Param(init(rngs.params(), (num_experts, mlp_dim, emb_dim), jnp.float32))
        self.num_experts = num_experts
        self.dtype = dtype
        self.ragged_dot = jax.lax.ragged_dot
        self.dot_general = jax.lax.dot_general
        self.ragged_impl = "xla"  # "pallas": quantized hooks get impl="pallas" (lowbit.dot.ragged_dot)

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(w[...].astype(self.dtype) for w in (self.wi_0, self.wi_1, self.wo))

    def grouped(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Rows of x_sorted[T*k, emb] grouped by expert (group_sizes[E]) -> [T*k, emb]."""
        # Only a swapped-in module hook that takes impl= (quantize_model's QuantRaggedDot) gets it; plain
        # functions and other modules keep the ragged_dot(lhs, rhs, group_sizes) contract.
        wants_impl = self.ragged_impl == "pallas" and _takes_impl(self.ragged_dot)
        impl = {"impl": "pallas"} if wants_impl else {}
        return self._swiglu(x_sorted, lambda a, w: self.ragged_dot(a, w, group_sizes, **impl))

    def batched(self, buffer: jax.Array) -> jax.Array:
        """Capacity buffer [E, C, emb] -> [E, C, emb], one GEMM per expert via the batch axis."""
        return self._swiglu(buffer, lambda a, w: self.dot_general(a, w, EXPERT_BATCHED_DIMS))

    def _swiglu(self, x: jax.Array, matmul) -> jax.Array:
        """wo(silu(x wi_0) * (x wi_1)) with each expert GEMM done by `matmul(a, w)` (a hook)."""
        wi_0, wi_1, wo = self._weights()
        x = x.astype(self.dtype)
        gate = checkpoint_name(matmul(x, wi_0), "moe_wi_0")
        up = checkpoint_name(matmul(x, wi_1), "moe_wi_1")
        hidden = (jax.nn.silu(gate) * up).astype(self.dtype)
        return checkpoint_name(matmul(hidden, wo), "moe_wo")


def _takes_impl(hook: Any) -> bool:
    """True for an nnx.Module hook whose call takes `impl=` by keyword (an `impl` parameter or **kwargs)."""
    if not isinstance(hook, nnx.Module):
        return False
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: keep the plain contract
        return False
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any((p.name == "impl" and p.kind in by_keyword) or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in params)


def dropless_dispatch(experts: MoeExperts, x: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Sort the N*k slots by expert, run the grouped GEMMs, unsort: -> per-slot outputs [N, k, emb]."""
    num_tokens, k = expert_index.shape
    flat_expert = expert_index.reshape(-1)  # slot s = token * k + choice
    order = jnp.argsort(flat_expert, stable=True)
    x_sorted = jnp.take(x, order // k, axis=0)
    group_sizes = jnp.bincount(flat_expert, length=experts.num_experts).astype(jnp.int32)
    y_sorted = experts.grouped(x_sorted, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return jnp.take(y_sorted, inverse, axis=0).reshape(num_tokens, k, -1)


def capacity_positions(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Arrival position of each slot in its expert's queue, choice-major ([k, N] order).

    All tokens' first choices queue before any second choice (GShard/Switch priority), tokens in
    order within a choice. Returns int32[k, N].
    """
    expert_by_choice = expert_index.T.reshape(-1)  # [k*N]
    onehot = jax.nn.one_hot(expert_by_choice, num_experts, dtype=jnp.int32)
    arrivals = jnp.cumsum(onehot, axis=0)
    position = jnp.take_along_axis(arrivals, expert_by_choice[:, None], axis=1)[:, 0] - 1
    return position.reshape(expert_index.shape[1], expert_index.shape[0])


def capacity_dispatch(experts: MoeExperts, x: jax.Array, expert_index: jax.Array,
                      capacity: int) -> tuple[jax.Array, jax.Array]:
    """Per routing group: scatter slots into [E, C, emb]; one batched GEMM per expert over all groups.

    x [G, N, emb], expert_index [G, N, k]: a group is a sequence, and capacity C applies per group
    (MaxText's rule), so under data/FSDP sharding a device dispatches only the rows it holds.
    Returns (per-slot outputs [G, N, k, emb], zero for dropped slots; kept bool[G, N, k]).
    """
    groups, num_tokens, k = expert_index.shape
    num_experts, emb = experts.num_experts, x.shape[-1]
    position = jax.vmap(capacity_positions, in_axes=(0, None))(expert_index, num_experts)  # [G, k, N]
    kept = position < capacity
    slot_position = jnp.where(kept, position, capacity).reshape(groups, -1)  # out of bounds -> dropped
    slot_expert = expert_index.transpose(0, 2, 1).reshape(groups, -1)
    slot_token = jnp.tile(jnp.arange(num_tokens), k)

    def scatter(x_group, expert, position):
        # Zero-filled buffer: empty rows hold zeros, never stale values (MaxText PR #4971).
        buffer = jnp.zeros((num_experts, capacity, emb), experts.dtype)
        return buffer.at[expert, position].set(x_group[slot_token].astype(experts.dtype), mode="drop")

    def gather(y_group, expert, position):
        return y_group.at[expert, position].get(mode="fill", fill_value=0)

    buffer = jax.vmap(scatter)(x, slot_expert, slot_position)  # [G, E, C, emb]
    stacked = buffer.transpose(1, 0, 2, 3).reshape(num_experts, groups * capacity, emb)
    # Zero slot rows up to a multiple of SLOT_ALIGN: they add nothing to outputs or gradients.
    pad = -(groups * capacity) % SLOT_ALIGN
    y_stacked = experts.batched(jnp.pad(stacked, ((0, 0), (0, pad), (0, 0))))[:, :groups * capacity]
    y_buffer = y_stacked.reshape(num_experts, groups, capacity, -1).transpose(1, 0, 2, 3)
    y_slots = jax.vmap(gather)(y_buffer, slot_expert, slot_position)  # [G, k*N, emb]
    return y_slots.reshape(groups, k, num_tokens, -1).transpose(0, 2, 1, 3), kept.transpose(0, 2, 1)


class MoeBlock(nnx.Module):
    """Routed experts (+ optional shared expert): y = sum_{e in topk(x)} g_e(x) * expert_e(x) + shared(x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # Router logits in float32 regardless of cfg.dtype: top-k is sensitive to small differences.
        self.router = nnx.Linear(cfg.emb_dim, cfg.num_experts, use_bias=False, dtype=jnp.float32,
                                 param_dtype=jnp.float32, kernel_init=kernel_init(cfg.init_scale),
                                 dot_general=jax.lax.dot_general, rngs=rngs)
        self.experts = MoeExperts(cfg.num_experts, cfg.emb_dim, cfg.moe_mlp_dim, dtype=cfg.compute_dtype,
                                  init_scale=cfg.init_scale, rngs=rngs)
        if cfg.moe_impl == "pallas":
            from lowbit.kernels.grouped_pallas import grouped_matmul  # lazy: Pallas only when asked for
            self.experts.ragged_dot = grouped_matmul
            self.experts.ragged_impl = "pallas"
        if cfg.num_shared_experts > 0:
            self.shared_expert = MlpBlock(cfg.emb_dim, cfg.num_shared_experts * cfg.moe_mlp_dim,
                                          dtype=cfg.compute_dtype, init_scale=cfg.init_scale, rngs=rngs)
        else:
            self.shared_expert = None
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, emb] -> (y [B, T, emb], stats: lb_loss, z_loss, expert_load[E], dropped_fraction)."""
        cfg = self.cfg
        batch, length, emb = x.shape
        tokens = x.reshape(batch * length, emb)
        router_logits = self.router(tokens.astype(jnp.float32))
        gates, expert_index, probs = route(router_logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        if cfg.moe_impl in ("dropless", "pallas"):
            y_slots = dropless_dispatch(self.experts, tokens, expert_index)
            dropped_fraction = jnp.zeros((), jnp.float32)
        else:
            capacity = expert_capacity(length, cfg)  # per sequence
            k = cfg.num_experts_per_tok
            per_sequence = expert_index.reshape(batch, length, k)
            y_slots, kept = capacity_dispatch(self.experts, x, per_sequence, capacity)
            y_slots = y_slots.reshape(batch * length, k, -1)
            # Count dropped slots (exact integer sum) rather than 1 - mean(kept), which rounds.
            dropped_fraction = jnp.sum(~kept).astype(jnp.float32) / kept.size
        y = jnp.einsum("nk,nkd->nd", gates, y_slots.astype(jnp.float32)).astype(x.dtype)
        y = y.reshape(batch, length, emb)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        stats = {
            "lb_loss": load_balance_loss(probs, expert_index),
            "z_loss": router_z_loss(router_logits),
            "expert_load": expert_load(expert_index, cfg.num_experts),
            "dropped_fraction": dropped_fraction,
        }
        return y, stats
