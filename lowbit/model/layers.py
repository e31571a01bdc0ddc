"""Building blocks: RMSNorm, rotary position embedding (RoPE), SwiGLU MLP, projection helper.

Every GEMM is an `nnx.Linear` whose `dot_general` attribute `lowbit.quantize_model` can replace;
this module never imports lowbit's quantization code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def kernel_init(init_scale: float, batch_axis: tuple[int, ...] = ()) -> nnx.Initializer:
    """Variance scaling, fan_in, truncated normal (MaxText's dense init); in axis -2, out axis -1."""
    return jax.nn.initializers.variance_scaling(
        init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis)


def projection(in_features: int, out_features: int, *, dtype: Any, init_scale: float,
               rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free nnx.Linear: f32 master kernel (in, out), GEMM in `dtype` via `self.dot_general`."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=kernel_init(init_scale), dot_general=jax.lax.dot_general, rngs=rngs)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019), statistics in float32."""

    def __init__(self, features: int, *, epsilon: float, dtype: Any):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (x32 * inv_rms * self.scale[...]).astype(self.dtype)


def rope_timescales(head_dim: int, theta: float) -> jax.Array:
    """theta^(2i/d) for i in [0, d/2): the wavelength (over 2 pi) of each rotated pair."""
    fraction = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    return jnp.asarray(theta, jnp.float32) ** fraction


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos / theta^(2i/d) (Su et al. 2021, RoFormer eq. 34).

    x: [B, T, H, D]; positions: [B, T] or [T] integer positions. Split-half pairing (as MaxText and
    Llama); computed in float32, returned in x's dtype.
    """
    head_dim = x.shape[-1]
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
    angle = positions[:, :, None, None] / rope_timescales(head_dim, theta)  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class MlpBlock(nnx.Module):
    """SwiGLU feed-forward: wo(silu(x wi_0) * (x wi_1)) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, emb_dim: int, hidden_dim: int, *, dtype: Any, init_scale: float, rngs: nnx.Rngs):
        self.wi_0 = projection(emb_dim, hidden_dim, dtype=dtype, init_scale=init_scale, rngs=rngs)
        self.wi_1 = projection(emb_dim, hidden_dim, dtype=dtype, init_scale=init_scale, rngs=rngs)
        self.wo = projection(hidden_dim, emb_dim, dtype=dtype, init_scale=init_scale, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = checkpoint_name(self.wi_0(x), "mlpwi_0")
        up = checkpoint_name(self.wi_1(x), "mlpwi_1")
        return checkpoint_name(self.wo(jax.nn.silu(gate) * up), "mlpwo")
