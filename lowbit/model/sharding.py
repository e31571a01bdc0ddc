"""Activation sharding hints: batch-major activations split over the mesh's batch axes.

FSDP keeps weights sharded and activations split by batch (ZeRO-3; MaxText's `activation_batch` rule).
The hints apply under a context mesh (`jax.set_mesh`, entered by lowbit.train) that has these axes;
elsewhere (one device, a user's own mesh without them, a batch they do not divide) they are no-ops.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")  # expert parallelism is data parallelism outside the MoE


def batch_axes() -> tuple[str, ...]:
    """The context mesh's automatic batch axes of size > 1 (() when no mesh is set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    # Manual axes (inside shard_map) and Explicit ones (sharding in types) are the user's to manage.
    auto = {a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Auto}
    return tuple(a for a in BATCH_AXES if a in auto and mesh.shape[a] > 1)


def constrain_batch(x: jax.Array) -> jax.Array:
    """x with dim 0 split over the context mesh's batch axes and every other dim replicated."""
    axes = batch_axes()
    if not axes or x.shape[0] % math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
