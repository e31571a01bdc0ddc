"""Flax glue: quantize_model on a lowbit-free NNX model, QuantDotGeneral, and the Linen dot_general_cls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import lowbit
import lowbit.linen
import lowbit.nn
from lowbit.dot import dot_general


class Block(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class Mlp(nnx.Module):
    """Written without lowbit: plain nnx.Linear / nnx.Einsum layers."""

    def __init__(self, dim: int, num_layers: int, rngs: nnx.Rngs):
        self.embed = nnx.Linear(16, dim, rngs=rngs)
        self.layers = nnx.List([Block(dim, rngs) for _ in range(num_layers)])
        self.head = nnx.Einsum("bd,dc->bc", (dim, 4), rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _data():
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 16))
    labels = jnp.argmax(x[:, :4], axis=-1)
    return x, labels


def _loss(model, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def test_quantize_model_trains_and_loss_decreases():
    model = Mlp(32, 2, nnx.Rngs(0))
    lowbit.quantize_model(model, "mxfp8", rules=[r"^embed$"])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, labels = _data()

    @nnx.jit
    def step(model, optimizer, x, labels):
        loss, grads = nnx.value_and_grad(_loss)(model, x, labels)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, labels)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    assert all(np.isfinite(losses))


def test_rules_and_keep_last_fraction_leave_paths_in_high_precision():
    model = Mlp(32, 4, nnx.Rngs(0))
    recipe = lowbit.get_recipe("mxfp8").replace(high_precision_rules=(r"(^|/)down$",),
                                                keep_last_fraction=0.25)
    lowbit.quantize_model(model, recipe, rules=[r"^embed$"])
    assert model.embed.dot_general is jax.lax.dot_general
    assert model.layers[3].up.dot_general is jax.lax.dot_general  # last 25% of 4 layers
    for i in range(3):
        assert isinstance(model.layers[i].up.dot_general, lowbit.nn.QuantDotGeneral)
        assert model.layers[i].down.dot_general is jax.lax.dot_general
    assert isinstance(model.head.einsum_op, lowbit.nn.QuantEinsum)
    report = {(h.path, h.attribute): h for h in lowbit.nn.conversion_report(model, recipe, [r"^embed$"])}
    assert report[("layers/0/up", "dot_general")].recipe == "mxfp8"
    assert report[("layers/3/up", "dot_general")].reason == "keep_last_fraction"
    assert report[("layers/1/down", "dot_general")].reason.startswith("rule")
    assert report[("embed", "dot_general")].recipe is None


def test_converted_model_matches_reference_quantized_forward():
    """The converted model's output equals the same layers computed with lowbit.dot_general directly."""
    model = Mlp(32, 1, nnx.Rngs(0))
    x, _ = _data()
    f = dot_general("mxfp8")
    dims = (((1,), (0,)), ((), ()))

    def manual(m, x):
        lin = lambda layer, h: f(h, layer.kernel[...], dims) + layer.bias[...]
        h = lin(m.embed, x)
        h = h + lin(m.layers[0].down, jax.nn.gelu(lin(m.layers[0].up, h)))
        return f(h, m.head.kernel[...], dims)  # nnx.Einsum without bias_shape has no bias

    want = nnx.jit(manual)(model, x)
    lowbit.quantize_model(model, "mxfp8")
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), want, rtol=1e-6, atol=1e-6)


def test_linear_takes_lowbit_dot_general_directly():
    layer = nnx.Linear(64, 32, dot_general=lowbit.dot_general("mxfp8"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = layer(x)
    ref = x @ layer.kernel[...] + layer.bias[...]
    rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.1  # quantized (not bitwise the float GEMM), and close


def test_quant_dot_general_draws_fresh_keys():
    rngs = nnx.Rngs(params=0, quant=1)
    layer = nnx.Linear(64, 64, dot_general=lowbit.nn.QuantDotGeneral("mxfp4", rngs=rngs), rngs=rngs)
    x = jax.random.normal(jax.random.key(2), (64, 64))  # tokens: a multiple of the RHT block 64

    @nnx.jit
    def grads(layer, x):
        return nnx.grad(lambda layer: jnp.sum(jnp.sin(layer(x))))(layer)

    g1, g2 = grads(layer, x), grads(layer, x)
    assert not np.array_equal(g1["kernel"][...], g2["kernel"][...])
    with pytest.raises(ValueError, match="'quant'"):
        lowbit.nn.QuantDotGeneral("mxfp4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant"):
        lowbit.quantize_model(Mlp(32, 1, nnx.Rngs(0)), "nvfp4")


def test_quant_ragged_dot_module():
    rngs = nnx.Rngs(quant=3)
    op = lowbit.nn.QuantRaggedDot("mxfp4", rngs=rngs)
    x = jax.random.normal(jax.random.key(3), (64, 64))
    w = jax.random.normal(jax.random.key(4), (3, 64, 64))
    sizes = jnp.array([20, 0, 44], jnp.int32)
    y = nnx.jit(lambda op, x, w: op(x, w, sizes))(op, x, w)
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-4)  # BF16-free fprop


def test_linen_dense_with_dot_general_cls():
    dense = linen.Dense(64, dot_general_cls=functools.partial(lowbit.linen.QuantDotGeneral, recipe="mxfp4"))
    x = jax.random.normal(jax.random.key(5), (64, 64))
    variables = dense.init({"params": jax.random.key(0), "quant": jax.random.key(1)}, x)

    def loss(params, key):
        return jnp.sum(jnp.sin(dense.apply({"params": params}, x, rngs={"quant": key})))

    grad = jax.jit(jax.grad(loss))
    g1 = grad(variables["params"], jax.random.key(2))
    g2 = grad(variables["params"], jax.random.key(3))
    g1_again = grad(variables["params"], jax.random.key(2))
    assert not np.array_equal(g1["kernel"], g2["kernel"])
    np.testing.assert_array_equal(g1["kernel"], g1_again["kernel"])
    with pytest.raises(ValueError, match="quant"):
        dense.apply(variables, x)
    plain = linen.Dense(64, dot_general_cls=functools.partial(lowbit.linen.QuantDotGeneral, recipe="mxfp8"))
    y = plain.apply(variables, x)
    ref = x @ variables["params"]["kernel"] + variables["params"]["bias"]
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.1
