"""Quantized dot_general / ragged_dot: every pass against a float64 NumPy reference built from qdq.

The reference quantizes each operand along the contraction axis of the GEMM that consumes it
(fprop: X along features, W along in-features; dgrad: dY and W along out-features; wgrad: X and dY
along tokens) and multiplies in float64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit
import lowbit.dot as dot_module
from lowbit.dot import dot_general, einsum, ragged_dot
from lowbit.hadamard import random_hadamard
from lowbit.recipes import OperandConfig, PassConfig, Recipe, get_recipe

DIMS = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N]
M, K, N = 64, 96, 64


def _nearest(recipe: Recipe) -> Recipe:
    """The recipe with RNE everywhere and no RHT: deterministic, so a reference can reproduce it."""
    def op(o):
        return dataclasses.replace(o, rounding="nearest")

    def pc(p):
        return PassConfig(op(p.lhs), op(p.rhs), None)

    return recipe.replace(name=recipe.name + "-rne", fprop=pc(recipe.fprop), dgrad=pc(recipe.dgrad),
                          wgrad=pc(recipe.wgrad))


def _scaled_inputs(seed: int):
    """x, w, dY whose rows AND columns have scales 2^[-10, 10]: blocks along the wrong axis mix them."""
    keys = jax.random.split(jax.random.key(seed), 7)

    def mat(k1, k2, k3, shape):
        rows = jnp.exp2(jax.random.randint(k2, (shape[0], 1), -10, 11).astype(jnp.float32))
        cols = jnp.exp2(jax.random.randint(k3, (1, shape[1]), -10, 11).astype(jnp.float32))
        return jax.random.normal(k1, shape) * rows * cols

    x = mat(*keys[0:3], (M, K))
    w = mat(keys[3], keys[4], keys[5], (K, N))
    g = mat(keys[6], keys[1], keys[4], (M, N))
    return x, w, g


_QDQ = jax.jit(lowbit.qdq, static_argnames=("fmt", "axis", "scale_mode", "prescale", "pad"))


def _qdq64(a, cfg: OperandConfig, axis):
    if not cfg.quantized:
        return np.asarray(a, np.float64)
    axis = axis if not cfg.block_2d else (0, 1)
    return np.asarray(_QDQ(a, fmt=cfg.format, axis=axis, scale_mode=cfg.scale_mode, prescale=cfg.prescale,
                           pad=True), np.float64)


def _reference(recipe: Recipe, x, w, g):
    """float64 (y, dx, dw) of the three GEMMs, each operand quantized along its GEMM's contraction axis."""
    r = recipe
    pairs = ((_qdq64(x, r.fprop.lhs, 1), _qdq64(w, r.fprop.rhs, 0)),
             (_qdq64(g, r.dgrad.lhs, 1), _qdq64(w, r.dgrad.rhs, 1).T),
             (_qdq64(x, r.wgrad.lhs, 0).T, _qdq64(g, r.wgrad.rhs, 0)))
    return [a @ b for a, b in pairs], [np.abs(a) @ np.abs(b) for a, b in pairs]


@functools.cache
def _compiled_passes(recipe):
    """jit(x, w, g, key) -> (y, dx, dw), one per recipe: tests that differ only in data or key share it."""
    f = dot_general(recipe)

    @jax.jit
    def run(x, w, g, key):
        kw = {} if key is None else {"key": key}
        y, vjp = jax.vjp(lambda x, w: f(x, w, DIMS, **kw), x, w)
        return (y, *vjp(g))

    return run


def _run(recipe, x, w, g, key=None):
    return _compiled_passes(recipe)(x, w, g, key)


def _check_against_reference(recipe, x, w, g):
    got = _run(recipe, x, w, g)
    refs, bounds = _reference(recipe, x, w, g)
    for name, a, ref, bound in zip(("fprop", "dgrad", "wgrad"), got, refs, bounds, strict=True):
        err = np.abs(np.asarray(a, np.float64) - ref)
        # float32 accumulation of exact products: |err| <= K * 2^-24 * sum |a||b| (K <= 96).
        assert np.all(err <= 1e-5 * bound + 1e-35), f"{recipe.name} {name}: max err {err.max()}"


RNE_RECIPES = ["fp8", "mxfp8", "nvfp4", "mxfp4", "mxfp4-nosr"]


@pytest.mark.parametrize("name", RNE_RECIPES)
def test_passes_match_float64_reference(name):
    recipe = _nearest(get_recipe(name))
    _check_against_reference(recipe, *_scaled_inputs(0))


def test_reference_check_fails_when_a_pass_quantizes_along_the_wrong_axis(monkeypatch):
    """The reference test above is sharp: flip one operand's block axis and it must fail."""
    recipe = _nearest(get_recipe("mxfp8"))
    x, w, g = _scaled_inputs(1)
    def wrong_axis(real):
        def patched(a, fmt, axis=-1, **kw):
            if a.shape == (1, M, N) and axis == 2:  # dY of dgrad: blocks along tokens instead of N
                axis = 1
            return real(a, fmt, axis=axis, **kw)
        return patched

    _check_against_reference(recipe, x, w, g)
    monkeypatch.setattr(dot_module, "quantize", wrong_axis(dot_module.quantize))
    with pytest.raises(AssertionError, match="dgrad"):  # a new name: traced afresh, with the patch
        _check_against_reference(recipe.replace(name="mxfp8-rne-wrong-axis"), x, w, g)


def test_bf16_recipe_is_exactly_lax_dot_general():
    x, w, g = _scaled_inputs(2)
    x, w, g = (a.astype(jnp.bfloat16) for a in (x, w, g))
    f = dot_general("bf16")
    for dims, lhs, rhs in [(DIMS, x, w), ((((1,), (1,)), ((), ())), x, w.T)]:
        y, vjp = jax.vjp(lambda a, b, dims=dims: f(a, b, dims), lhs, rhs)
        y_ref, vjp_ref = jax.vjp(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims), lhs, rhs)
        assert y.dtype == y_ref.dtype == jnp.bfloat16
        np.testing.assert_array_equal(y, y_ref)
        for a, b in zip(vjp(g), vjp_ref(g), strict=True):
            np.testing.assert_array_equal(a, b)


def test_general_dimension_numbers_batch_and_two_contracting_dims():
    """[b, m, k1, k2] x [b, k2, k1, n]: flattening to [B, M, K] keeps blocks along K (k1-major)."""
    recipe = _nearest(get_recipe("mxfp8"))
    key = jax.random.key(3)
    lhs = jax.random.normal(key, (2, 8, 4, 16))
    rhs = jax.random.normal(jax.random.fold_in(key, 1), (2, 16, 4, 8))
    dims = (((2, 3), (2, 1)), ((0,), (0,)))
    y = jax.jit(lambda a, b: dot_general(recipe)(a, b, dims))(lhs, rhs)
    assert y.shape == jax.lax.dot_general(lhs, rhs, dims).shape == (2, 8, 8)
    x3 = np.asarray(lhs).reshape(2, 8, 64)  # K = (k1, k2) flattened k1-major
    w3 = np.asarray(rhs).transpose(0, 2, 1, 3).reshape(2, 64, 8)
    q = lambda a, axis: _qdq64(a, OperandConfig("mxfp8", scale_mode="rceil"), axis)
    ref = np.einsum("bmk,bkn->bmn", q(x3, 2), q(w3, 1))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)


def test_einsum_matches_dot_general():
    recipe = _nearest(get_recipe("mxfp8"))
    x = jax.random.normal(jax.random.key(4), (2, 32, 64))
    w = jax.random.normal(jax.random.key(5), (64, 4, 8))
    y = jax.jit(lambda x, w: einsum(recipe)("btd,dnh->bnth", x, w))(x, w)
    dims = (((2,), (0,)), ((), ()))
    y_dg = jax.jit(lambda x, w: dot_general(recipe)(x, w, dims))(x, w).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(y, y_dg)
    with pytest.raises(NotImplementedError, match="ellipsis"):
        einsum(recipe)("...d,dh->...h", x, w[:, 0])


def test_missing_key_is_an_error():
    x, w, _ = _scaled_inputs(0)
    with pytest.raises(ValueError, match="pass key=.*QuantDotGeneral"):
        dot_general("mxfp4")(x, w, DIMS)
    with pytest.raises(ValueError, match="key"):
        ragged_dot(x, w[None], jnp.array([M]), "nvfp4")


def test_transformations_jit_vmap_scan_remat():
    recipe = get_recipe("mxfp4")  # SR + RHT (per-call keys through the residuals)
    f = dot_general(recipe)
    key = jax.random.key(6)
    xs = jax.random.normal(key, (3, 64, 64))
    w = jax.random.normal(jax.random.fold_in(key, 1), (64, 64))
    keys = jax.random.split(jax.random.fold_in(key, 2), 3)

    def loss(x, w, k):
        return jnp.sum(jnp.sin(f(x, w, DIMS, key=k)))

    grad = jax.grad(loss, argnums=(0, 1))
    eager = [grad(xs[0], w, keys[0])] + [jax.jit(grad)(xs[i], w, keys[i]) for i in (1, 2)]
    jitted = jax.jit(grad)(xs[0], w, keys[0])
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(xs[0], w, keys[0])
    vmapped = jax.jit(jax.vmap(grad, in_axes=(0, None, 0)))(xs, w, keys)

    def scan_loss(w):
        def body(carry, inp):
            x, k = inp
            return carry + loss(x, w, k), None
        return jax.lax.scan(body, 0.0, (xs, keys))[0]

    scanned = jax.jit(jax.grad(scan_loss))(w)
    for a, b in zip(jitted, eager[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(remat, eager[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(vmapped[0][i], eager[i][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vmapped[1][i], eager[i][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scanned, sum(e[1] for e in eager), rtol=1e-4, atol=1e-5)


def test_sharded_equals_unsharded():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    f = dot_general("mxfp8")
    x, w, _ = _scaled_inputs(7)
    x, w = x / 1e3, w / 1e3

    def loss(x, w):
        return jnp.sum(jnp.tanh(f(x, w, DIMS)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    got = step(xs, ws)
    assert got[1][0].sharding.num_devices == 8
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_stochastic_rounding_keys():
    x, w, g = (a / 1e3 for a in _scaled_inputs(8))
    recipe = get_recipe("mxfp4")
    a = _run(recipe, x, w, g, jax.random.key(1))
    b = _run(recipe, x, w, g, jax.random.key(1))
    c = _run(recipe, x, w, g, jax.random.key(2))
    np.testing.assert_array_equal(a[0], c[0])  # fprop is BF16 in this recipe: no randomness
    for i in (1, 2):
        np.testing.assert_array_equal(a[i], b[i])
        assert not np.array_equal(a[i], c[i])


@pytest.mark.parametrize("name", ["mxfp4", "mxfp4-norht"])
def test_stochastic_rounding_is_unbiased(name):
    """E[q(A)] E[q(B)] = A B with independent SR of both operands (and RHT, which cancels exactly).

    Mean over n keys vs the exact float64 gradient: |mean - exact| <= 6 sigma/sqrt(n) elementwise,
    sigma estimated from the samples (plus a float32-accumulation floor).
    """
    key = jax.random.key(9)
    x = jax.random.normal(key, (64, 64))
    w = jax.random.normal(jax.random.fold_in(key, 1), (64, 64))
    g = jax.random.normal(jax.random.fold_in(key, 2), (64, 64))
    f = dot_general(name)
    n = 96

    def grads(k):
        return jax.vjp(lambda x, w: f(x, w, DIMS, key=k), x, w)[1](g)

    dx, dw = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(10), n))
    exact = (np.asarray(g, np.float64) @ np.asarray(w, np.float64).T,
             np.asarray(x, np.float64).T @ np.asarray(g, np.float64))
    for samples, ref in zip((dx, dw), exact, strict=True):
        samples = np.asarray(samples, np.float64)
        mean, sigma = samples.mean(0), samples.std(0, ddof=1)
        assert np.all(np.abs(mean - ref) <= 6 * sigma / np.sqrt(n) + 1e-4 * np.abs(ref).max())
        # and the rounding noise is real (not a silent high-precision path)
        assert sigma.mean() > 1e-3 * np.abs(ref).mean()


def test_rht_pass_matches_reference_with_the_same_signs():
    """mxfp4-nosr dgrad: dX = qdq(RHT(dY) along N) . qdq(RHT(W) along N)^T with one sign vector."""
    recipe = get_recipe("mxfp4-nosr")
    x, w, g = (a / 1e3 for a in _scaled_inputs(11))
    key = jax.random.key(12)
    _, dx, dw = _run(recipe, x, w, g, key)
    k_dgrad = dot_module._pass_keys(key, "dgrad")[2]
    k_wgrad = dot_module._pass_keys(key, "wgrad")[2]
    def q(a, k, axis):  # RHT along `axis`, then MXFP4 blocks along the same axis
        return _qdq64(random_hadamard(a, k, axis=axis, block=64), OperandConfig("mxfp4"), axis)

    dx_ref = q(g, k_dgrad, 1) @ q(w, k_dgrad, 1).T
    dw_ref = q(x, k_wgrad, 0).T @ q(g, k_wgrad, 0)
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_residuals_are_quantized_and_smaller():
    """Saved for the backward pass: X (along tokens) and W (along out-features) as QArrays."""
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.bfloat16)

    def residual_bytes(name):
        f = dot_general(name)
        _, vjp = jax.vjp(lambda x, w: f(x, w, DIMS), x, w)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "nbytes"))

    bf16 = residual_bytes("bf16")
    assert bf16 == x.nbytes + w.nbytes
    # MXFP8: 1 byte + 1/32 scale byte per element vs 2 bytes.
    assert residual_bytes("mxfp8") <= bf16 * (1 + 1 / 32) / 2 + 64
    assert residual_bytes("fp8") <= bf16 / 2 + 64


RAGGED_RECIPES = {
    "mxfp8": _nearest(get_recipe("mxfp8")),
    "mxfp4-prescaled": Recipe(
        "mxfp4-prescaled", fprop=PassConfig(OperandConfig("mxfp4"), OperandConfig("mxfp4")),
        dgrad=PassConfig(OperandConfig("mxfp4", prescale=0.75), OperandConfig("mxfp4")),
        wgrad=PassConfig(OperandConfig("mxfp4"), OperandConfig("mxfp4", prescale=0.75))),
}


@pytest.mark.parametrize("name", list(RAGGED_RECIPES))
@pytest.mark.parametrize("group_sizes", [(0, 37, 5, 0, 54), (40, 0, 0, 33, 10)])  # 2nd: 9 rows unused
def test_ragged_dot_matches_per_group_reference(name, group_sizes):
    recipe = RAGGED_RECIPES[name]
    t, k, n = 96, 64, 32
    key = jax.random.key(13)
    x = jax.random.normal(key, (t, k)) * jnp.exp2(jax.random.randint(key, (t, 1), -6, 7).astype(jnp.float32))
    w = jax.random.normal(jax.random.fold_in(key, 1), (len(group_sizes), k, n))
    g = jax.random.normal(jax.random.fold_in(key, 2), (t, n))
    sizes = jnp.array(group_sizes, jnp.int32)
    @jax.jit
    def run(x, w, g):
        y, vjp = jax.vjp(lambda x, w: ragged_dot(x, w, sizes, recipe), x, w)
        return (y, *vjp(g))

    y, dx, dw = run(x, w, g)

    r = recipe
    ends = np.cumsum(group_sizes)
    starts = ends - np.array(group_sizes)
    y_ref, dx_ref = np.zeros((t, n)), np.zeros((t, k))
    dw_ref = np.zeros(w.shape)
    xq, gq = _qdq64(x, r.fprop.lhs, 1), _qdq64(g, r.dgrad.lhs, 1)
    wq_f, wq_d = _qdq64(w, r.fprop.rhs, 1), _qdq64(w, r.dgrad.rhs, 2)
    for e, (s0, s1) in enumerate(zip(starts, ends, strict=True)):
        y_ref[s0:s1] = xq[s0:s1] @ wq_f[e]
        dx_ref[s0:s1] = gq[s0:s1] @ wq_d[e].T
        if s1 > s0:  # wgrad blocks along this group's own tokens only (last block partial)
            dw_ref[e] = _qdq64(x[s0:s1], r.wgrad.lhs, 0).T @ _qdq64(g[s0:s1], r.wgrad.rhs, 0)
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
