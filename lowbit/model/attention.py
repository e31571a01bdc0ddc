"""Grouped-query causal self-attention with RoPE.

Projections `query`, `key`, `value`, `out` are nnx.Linear (hookable GEMMs). The score and value
batched matmuls run inside `jax.nn.dot_product_attention` and stay in high precision (they are
not weight GEMMs and are never quantized). attention_impl "auto" picks cuDNN's fused flash attention on
an NVIDIA GPU (sm80+) for bf16/fp16 heads of width <= 128 (1.44x faster bf16 step at moe-1.8b on an H100,
docs/benchmarks.md) and XLA's softmax(q k^T) v elsewhere (CPU, TPU, ROCm); None / "xla" / "cudnn" are
passed to jax as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lowbit.model.config import ModelConfig
from lowbit.model.layers import apply_rope, projection
from lowbit.model.sharding import constrain_batch

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# jax (0.10.2, 0.11) lets cuDNN flash attention take heads up to 256 wide on sm90+, 128 on sm80/86/89, each a
# multiple of 8 (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention); 128 holds on every one.
CUDNN_MAX_HEAD_DIM = 128
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)  # cuDNN's fused flash attention needs Ampere or newer


def _compute_capability(device: Any) -> tuple[int, int] | None:
    """A CUDA device's compute capability ("9.0" -> (9, 0)); None where it has none or it does not parse."""
    try:
        major, minor = str(device.compute_capability).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def default_gpu_platform() -> tuple[str, tuple[int, int] | None]:
    """(platform, compute capability) of the default backend, with "cuda" / "rocm" for a GPU: jax names every
    GPU backend "gpu", and only CUDA has cuDNN (jax's own check: "cuda" in the backend's platform_version)."""
    platform = jax.default_backend()
    if platform != "gpu":
        return platform, None
    try:
        from jax.extend import backend as jax_backend

        version = str(jax_backend.get_backend().platform_version).lower()
    except (ImportError, AttributeError):
        version = "cuda"  # unreadable: assume the common case (cuDNN fails loudly, never silently)
    if "cuda" not in version:
        return ("rocm" if "rocm" in version else "gpu (not CUDA)"), None
    return "cuda", _compute_capability(jax.devices()[0])


def resolve_attention_impl(impl: str | None, dtype: Any, head_dim: int, platform: str | None = None,
                           compute_capability: tuple[int, int] | None = None) -> str | None:
    """The jax.nn.dot_product_attention implementation for a config's attention_impl: "auto" is "cudnn" on an
    NVIDIA GPU (platform "cuda" or "gpu"; compute capability >= 8.0 where known) for bf16/fp16 heads of width
    <= 128, a multiple of 8; "xla" otherwise. platform / compute_capability: the default backend's unless
    platform is given. Other values of impl are returned unchanged."""
    if impl != "auto":
        return impl
    if platform is None:
        platform, compute_capability = default_gpu_platform()
    fits = jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim % 8 == 0 \
        and head_dim <= CUDNN_MAX_HEAD_DIM
    new_enough = compute_capability is None or tuple(compute_capability) >= CUDNN_MIN_COMPUTE_CAPABILITY
    return "cudnn" if platform in ("gpu", "cuda") and fits and new_enough else "xla"


def config_attention_impl(cfg: ModelConfig) -> str:
    """What cfg.attention_impl runs as on the default backend ("cudnn" or "xla"; None is jax's XLA)."""
    return resolve_attention_impl(cfg.attention_impl, cfg.compute_dtype, cfg.head_dim) or "xla"


class Attention(nnx.Module):
    """softmax(q k^T / sqrt(d) + causal mask) v with Hq query heads sharing Hkv key/value heads.

    GQA (Ainslie et al. 2023): query head h reads key/value head h // (Hq / Hkv).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        q_features = cfg.num_query_heads * cfg.head_dim
        kv_features = cfg.num_kv_heads * cfg.head_dim
        kw = dict(dtype=dtype, init_scale=cfg.init_scale, rngs=rngs)
        self.query = projection(cfg.emb_dim, q_features, **kw)
        self.key = projection(cfg.emb_dim, kv_features, **kw)
        self.value = projection(cfg.emb_dim, kv_features, **kw)
        self.out = projection(q_features, cfg.emb_dim, **kw)
        self.num_query_heads = cfg.num_query_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.attention_impl = cfg.attention_impl

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        q = checkpoint_name(self.query(x), "query_proj")
        k = checkpoint_name(self.key(x), "key_proj")
        v = checkpoint_name(self.value(x), "value_proj")
        q = q.reshape(batch, length, self.num_query_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        # [B, T, N, H] layout with K heads dividing N heads is GQA natively; scale 1/sqrt(H).
        # q, k, v split alike (by batch): cuDNN's partitioner rejects q, k, v sharded differently.
        q, k, v = constrain_batch(q), constrain_batch(k), constrain_batch(v)
        impl = resolve_attention_impl(self.attention_impl, q.dtype, self.head_dim)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        attended = attended.reshape(batch, length, self.num_query_heads * self.head_dim)
        return checkpoint_name(self.out(attended.astype(x.dtype)), "out_proj")

