"""Activation sharding hints (lowbit.model.sharding) on 8 simulated CPU devices (tests/conftest.py).

The regression: under FSDP, XLA's propagation split q, k, v by heads from the sharded projection
weights, and differently from each other on two H200s; cuDNN attention's partitioner then failed with
"Query, key and value should have same sharding" (docs/benchmarks.md, two-GPU run).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowbit import train
from lowbit.bench_step import step_batch
from lowbit.config import load_config
from lowbit.model import MoeBlock, attention, expert_capacity, get_model_config
from lowbit.model.sharding import batch_axes, constrain_batch


def mesh_of(data: int, fsdp: int, expert: int) -> Mesh:
    devices = np.asarray(jax.devices()[:data * fsdp * expert]).reshape(data, fsdp, expert)
    return Mesh(devices, ("data", "fsdp", "expert"))


def test_no_context_mesh_is_a_no_op():
    x = jnp.ones((4, 3))
    assert batch_axes() == ()
    assert constrain_batch(x) is x


@pytest.mark.parametrize("shape,expected", [
    ((1, 2, 1), P(("fsdp",), None)),
    ((2, 2, 2), P(("data", "fsdp", "expert"), None)),
    ((2, 1, 1), P(("data",), None)),
])
def test_dim0_is_split_over_the_batch_axes_larger_than_one(shape, expected):
    mesh = mesh_of(*shape)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: constrain_batch(x * 2))(jnp.ones((8, 3)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, expected), 2)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 3)))


def test_indivisible_batch_and_foreign_mesh_are_left_alone():
    with jax.set_mesh(mesh_of(1, 4, 1)):
        y = jax.jit(lambda x: constrain_batch(x + 1))(jnp.ones((6, 3)))  # 6 rows over 4 devices
        assert jax.jit(lambda x: jnp.asarray(batch_axes() == ("fsdp",)))(y)
    assert y.sharding.is_fully_replicated
    foreign = Mesh(np.asarray(jax.devices()[:2]), ("model",))
    with jax.set_mesh(foreign):
        assert batch_axes() == ()
    explicit = Mesh(np.asarray(jax.devices()[:2]), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):  # sharding in types: the user's to manage
        assert batch_axes() == ()
        assert jax.jit(lambda x: constrain_batch(x) * 2)(jnp.ones((4, 3))).shape == (4, 3)


def test_manual_axes_under_shard_map_are_not_constrained():
    mesh = mesh_of(1, 2, 1)
    shard_map = getattr(jax, "shard_map", None) or jax.experimental.shard_map.shard_map

    def body(x):
        assert batch_axes() == ()  # fsdp is manual inside the map
        return constrain_batch(x) * 3

    with jax.set_mesh(mesh):
        y = jax.jit(shard_map(body, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp")))(jnp.ones((4, 2)))
    np.testing.assert_array_equal(np.asarray(y), 3 * np.ones((4, 2)))


@pytest.mark.parametrize("mesh_overrides", [("ici_fsdp=2",), ("ici_data=2", "ici_fsdp=2", "ici_expert=2")])
def test_train_step_splits_q_k_v_alike_by_batch(mesh_overrides, monkeypatch):
    """The shardings the compiler gave q, k, v at the attention call (what cuDNN's partitioner sees)."""
    seen: list[tuple[str, object]] = []
    plain = jax.nn.dot_product_attention

    def spy(q, k, v, **kw):
        for name, t in zip("qkv", (q, k, v), strict=True):
            jax.debug.inspect_array_sharding(t, callback=lambda s, name=name: seen.append((name, s)))
        return plain(q, k, v, **kw)

    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(train, "_COMPILED", {})  # trace afresh, so the spy sees this step's q, k, v
    config = load_config("tiny", ["ici_data=1", "ici_expert=1", *mesh_overrides])
    parts = train.build_step(config, "bf16")
    mesh = parts.mesh
    parts.train_step.lower(parts.state, step_batch(config, mesh, "random"), parts.schedule,
                           jnp.float32(0)).compile()

    axes = tuple(a for a, n in mesh.shape.items() if n > 1)
    assert len(seen) == 3 * config.model.num_decoder_layers
    want = NamedSharding(mesh, P(axes))
    assert all(s.is_equivalent_to(want, 4) for _, s in seen), seen


def _collective_elements(hlo: str) -> int:
    """Elements moved by a compiled module's collectives (their result shapes, tuples included)."""
    total = 0
    ops = r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
    for shape in re.findall(rf"= (\([^)]*\)|\S+) (?:{ops})(?:-start)?\(", hlo):
        for dims in re.findall(r"\w+\[([\d,]*)\]", shape):
            total += math.prod(int(d) for d in dims.split(",") if d)
    return total


def test_capacity_dispatch_stays_on_each_devices_rows():
    """Batch split over fsdp=2, weights replicated: besides the weight gradients' all-reduce, the MoE's
    forward and backward move almost nothing between devices. The global capacity queue it replaced
    summed whole [E, C, emb] buffers across devices (24 all-reduces per step on two H200s)."""
    cfg = dataclasses.replace(get_model_config("tiny"), moe_impl="capacity", dtype="float32")
    block = MoeBlock(cfg, rngs=nnx.Rngs(0))
    batch, length = 8, 64
    x = jax.random.normal(jax.random.key(1), (batch, length, cfg.emb_dim), jnp.float32)
    mesh = mesh_of(1, 2, 1)

    def loss(block, x):
        y, stats = block(x)
        return jnp.sum(y ** 2) + stats["lb_loss"]

    with jax.set_mesh(mesh):
        x = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
        hlo = nnx.jit(nnx.grad(loss)).lower(block, x).compile().as_text()
    weights = sum(p.size for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
    buffer = cfg.num_experts * batch * expert_capacity(length, cfg) * cfg.emb_dim
    moved = _collective_elements(hlo)
    assert moved >= weights  # the count sees the gradient all-reduce, a tuple-shaped collective
    assert moved - weights < buffer // 20, (moved, weights, buffer)
