"""lowbit's GEMMs with the fused quantize kernel (lowbit.kernels.dispatch; Pallas interpret mode on the CPU).

Forced to "fused", dot_general / einsum / ragged_dot must give the bits of the "xla" switch (outputs
and gradients), stochastic rounding included (one hashed u per element for both implementations),
while a counter on the kernel proves it really ran; calls the kernel cannot take fall back to
lowbit.quantize silently; "auto" stays on XLA on the CPU and with several devices, and takes SR on
a (simulated) single GPU; bad switch values are refused with the list of choices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit.kernels import (
    QUANTIZE_IMPLS,
    dispatch,
    get_quantize_impl,
    quantize_impl,
    set_quantize_impl,
)

DIMS = (((1,), (0,)), ((), ()))  # x [M, K] . w [K, N]
BATCHED_DIMS = (((2,), (1,)), ((0,), (0,)))  # x [B, M, K] . w [B, K, N]


@pytest.fixture(autouse=True)
def _default_switch():
    set_quantize_impl(None)
    yield
    set_quantize_impl(None)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the fused kernel (at trace time) and of lowbit.quantize made for dot.py."""
    calls = {"fused": 0, "xla": 0}
    real_fused, real_xla = dispatch.quantize_fused, dispatch.quantize_xla

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return real_fused(*args, **kwargs)

    def xla(*args, **kwargs):
        calls["xla"] += 1
        return real_xla(*args, **kwargs)

    monkeypatch.setattr(dispatch, "quantize_fused", fused)
    monkeypatch.setattr(dispatch, "quantize_xla", xla)
    return calls


def _bits(a) -> np.ndarray:
    """Raw bits of an array, so that -0 != +0 and NaN payloads count."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _inputs(lhs_shape, rhs_shape, out_shape, seed=0):
    """Normal data with per-row scales 2^[-8, 8]: blocks of very different amax."""
    keys = jax.random.split(jax.random.key(seed), 4)

    def scaled(k, shape):
        rows = jnp.exp2(jax.random.randint(keys[3], (*shape[:-1], 1), -8, 9).astype(jnp.float32))
        return jax.random.normal(k, shape) * rows

    return scaled(keys[0], lhs_shape), scaled(keys[1], rhs_shape), scaled(keys[2], out_shape)


def _fwd_bwd(impl: str, recipe: str, lhs, rhs, g, dims=DIMS):
    """(y, dlhs, drhs) of lowbit.dot_general(recipe) under the switch `impl`, traced afresh."""
    f = lowbit.dot_general(recipe)
    key = jax.random.key(7)

    def run(lhs, rhs, g):
        y, vjp = jax.vjp(lambda a, b: f(a, b, dims, key=key), lhs, rhs)
        return (y, *vjp(g))

    with quantize_impl(impl):
        return jax.jit(run)(lhs, rhs, g)  # a new function object: jit traces it under `impl`


def _assert_same_bits(got, want):
    assert len(got) == len(want)
    for name, a, b in zip(("y", "dlhs", "drhs"), got, want, strict=False):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)


# (recipe, lhs shape, rhs shape, dims, fused quantizations per fwd+bwd).
# mxfp8: 2 fprop + dgrad W + wgrad X + dY + dYᵀ. nvfp4: X, 16x16-tiled W (reused for dgrad), wgrad X
# after RHT, dY (SR), dYᵀ (SR, RHT). mxfp4(-nosr): BF16 fprop; dgrad and wgrad after RHT64 (mxfp4: SR).
CASES = [
    ("mxfp8", (64, 64), (64, 32), DIMS, 6),
    ("nvfp4", (32, 64), (64, 32), DIMS, 5),
    ("mxfp4-nosr", (64, 64), (64, 64), DIMS, 4),
    ("mxfp4", (64, 64), (64, 64), DIMS, 4),
    ("nvfp4", (2, 16, 32), (2, 32, 48), BATCHED_DIMS, 5),
    ("mxfp8", (3, 32, 64), (3, 64, 32), BATCHED_DIMS, 6),
]


@pytest.mark.parametrize(("recipe", "lhs_shape", "rhs_shape", "dims", "fused_count"), CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
def test_fused_matches_xla_bit_for_bit(kernel_calls, recipe, lhs_shape, rhs_shape, dims, fused_count):
    out_shape = (*lhs_shape[:-1], rhs_shape[-1])
    lhs, rhs, g = _inputs(lhs_shape, rhs_shape, out_shape)
    want = _fwd_bwd("xla", recipe, lhs, rhs, g, dims)
    assert kernel_calls["fused"] == 0
    got = _fwd_bwd("fused", recipe, lhs, rhs, g, dims)
    assert kernel_calls["fused"] == fused_count  # every operand went through the kernel
    _assert_same_bits(got, want)


def test_einsum_goes_through_the_kernel(kernel_calls):
    lhs, rhs, _ = _inputs((2, 32, 32), (32, 32), (2, 32, 32), seed=1)
    with quantize_impl("xla"):
        want = jax.jit(lambda a, b: lowbit.einsum("mxfp8")("btd,dh->bth", a, b))(lhs, rhs)
    with quantize_impl("fused"):
        got = jax.jit(lambda a, b: lowbit.einsum("mxfp8")("btd,dh->bth", a, b))(lhs, rhs)
    assert kernel_calls["fused"] == 4  # fprop's X and W, and the residuals X (wgrad), W (dgrad)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_ragged_dot_uses_the_kernel_where_blocks_run_along_the_last_axis(kernel_calls):
    """x and dY along K / N, W along N take the kernel; W along K (axis 1) and the token-blocked
    wgrad operands (axis 0) are not along the last axis and stay on XLA, with the same result."""
    x, _, dy = _inputs((64, 32), (32, 32), (64, 32), seed=2)
    w = jax.random.normal(jax.random.key(3), (2, 32, 32))
    group_sizes = jnp.array([24, 40], jnp.int32)

    def run(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: lowbit.ragged_dot(a, b, group_sizes, recipe="mxfp8"), x, w)
        return (y, *vjp(dy))

    with quantize_impl("xla"):
        want = jax.jit(run)(x, w, dy)
    with quantize_impl("fused"):
        got = jax.jit(lambda *a: run(*a))(x, w, dy)
    assert kernel_calls["fused"] == 3
    _assert_same_bits(got, want)


def test_einsum_and_ragged_dot_with_stochastic_rounding(kernel_calls):
    """mxfp4 (SR on every backward operand): einsum's dgrad/wgrad operands and ragged_dot's dY and
    W along N go through the kernel and give the XLA switch's bits (the SR draws included)."""
    lhs, rhs, g = _inputs((2, 32, 64), (64, 64), (2, 32, 64), seed=8)
    key = jax.random.key(9)

    def einsum_fwd_bwd(a, b, g):
        y, vjp = jax.vjp(lambda a, b: lowbit.einsum("mxfp4")("btd,dh->bth", a, b, key=key), a, b)
        return (y, *vjp(g))

    group_sizes = jnp.array([24, 40], jnp.int32)
    w = jax.random.normal(jax.random.key(10), (2, 64, 64))

    def ragged_fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda a, b: lowbit.ragged_dot(a, b, group_sizes, "mxfp4", key=key), x, w)
        return (y, *vjp(dy))

    x, dy = lhs.reshape(64, 64), g.reshape(64, 64)
    with quantize_impl("xla"):
        want = (jax.jit(einsum_fwd_bwd)(lhs, rhs, g), jax.jit(ragged_fwd_bwd)(x, w, dy))
    with quantize_impl("fused"):
        got_einsum = jax.jit(lambda *a: einsum_fwd_bwd(*a))(lhs, rhs, g)
        assert kernel_calls["fused"] == 4  # dgrad dY, W; wgrad X, dY (all SR)
        got_ragged = jax.jit(lambda *a: ragged_fwd_bwd(*a))(x, w, dy)
        assert kernel_calls["fused"] == 6  # + W along N, dY along N (tokens-blocked wgrad: XLA)
    _assert_same_bits(got_einsum, want[0])
    _assert_same_bits(got_ragged, want[1])


def test_shapes_the_kernel_cannot_take_fall_back_to_xla(kernel_calls):
    """K = 48 is no multiple of 32: both fprop operands need pad=True and go to XLA; dgrad (along
    N = 32) and wgrad (along M = 64) still take the kernel. The result is the XLA switch's."""
    lhs, rhs, g = _inputs((64, 48), (48, 32), (64, 32), seed=3)
    want = _fwd_bwd("xla", "mxfp8", lhs, rhs, g)
    xla_calls = kernel_calls["xla"]
    got = _fwd_bwd("fused", "mxfp8", lhs, rhs, g)
    assert kernel_calls["fused"] == 4 and kernel_calls["xla"] - xla_calls == 2
    _assert_same_bits(got, want)


@pytest.mark.parametrize(("fmt", "shape", "axis", "kw"), [
    ("nvfp4", (2, 8, 32), (1, 2), {"pad": True}),  # 16x16 tiles would straddle the two batch rows
    ("mxfp8", (64, 32), 0, {}),  # blocks along a leading axis
    ("mxfp8", (4, 48), -1, {"pad": True}),  # partial block
    ("fp8", (8, 32), -1, {}),  # per-tensor scaling
    ("mxfp6_e2m3", (8, 32), -1, {}),  # FP6: no kernel
    ("mxfp8", (0, 32), -1, {}),  # empty
])
def test_dispatch_declines_and_matches_lowbit_quantize(kernel_calls, fmt, shape, axis, kw):
    x = jax.random.normal(jax.random.key(4), shape)
    with quantize_impl("fused"):
        assert not dispatch.use_fused(x, fmt, axis)
        got = dispatch.quantize(x, fmt, axis=axis, **kw)
    want = lowbit.quantize(x, fmt, axis=axis, **kw)
    assert kernel_calls["fused"] == 0
    assert got.axis == want.axis and got.fmt == want.fmt
    for name in ("data", "scale", "tensor_scale"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(_bits(a.astype(jnp.float32)), _bits(b.astype(jnp.float32)))


def test_batched_tiles_keep_quantizes_structure():
    """[B, rows, K] NVFP4 16x16 tiles through the kernel: lowbit.quantize's shapes, axis, dtypes and
    tensor scale (amax over the whole batch, so the batch with the larger amax sets it)."""
    x = jax.random.normal(jax.random.key(5), (3, 32, 48)) * jnp.array([1.0, 50.0, 0.01])[:, None, None]
    want = lowbit.quantize(x, "nvfp4", axis=(1, 2))
    with quantize_impl("fused"):
        got = dispatch.quantize(x, "nvfp4", axis=(1, 2))
    assert got.axis == want.axis == (1, 2) and got.prescale == want.prescale
    assert got.scale.shape == want.scale.shape == (3, 2, 3)
    for name in ("data", "scale", "tensor_scale"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(_bits(a.astype(jnp.float32)), _bits(b.astype(jnp.float32)))


def test_auto_on_the_cpu_uses_xla(kernel_calls):
    assert jax.default_backend() == "cpu"
    lhs, rhs, g = _inputs((64, 64), (64, 32), (64, 32), seed=6)
    with quantize_impl("auto"):
        assert not dispatch.use_fused(lhs, "mxfp8")
    _fwd_bwd("auto", "mxfp8", lhs, rhs, g)
    assert kernel_calls["fused"] == 0 and kernel_calls["xla"] == 6


def test_auto_policy_on_a_simulated_single_gpu(monkeypatch):
    """With a GPU (simulated: the kernel's availability check told so) and one device, "auto" takes
    the kernel for round-to-nearest and stochastic rounding alike; several devices stay on XLA."""
    real_available = dispatch.fused_available
    monkeypatch.setattr(dispatch, "fused_available",
                        lambda *a, require_gpu=True, **kw: real_available(*a, require_gpu=False, **kw))
    x = jnp.ones((32, 64), jnp.float32)
    key = jax.random.key(0)
    with quantize_impl("auto"):
        monkeypatch.setattr(dispatch, "_single_device", lambda: True)
        assert dispatch.use_fused(x, "mxfp8")
        assert dispatch.use_fused(x, "nvfp4", axis=(0, 1))
        assert dispatch.use_fused(x, "mxfp4", rounding="stochastic", key=key)
        assert dispatch.use_fused(x, "nvfp4", rounding="stochastic", key=key)
        assert not dispatch.use_fused(x, "mxfp4", rounding="stochastic")  # no key: XLA's error
        assert not dispatch.use_fused(x, "mxfp8", axis=0)
        monkeypatch.setattr(dispatch, "_single_device", lambda: False)
        assert not dispatch.use_fused(x, "mxfp8")
    with quantize_impl("fused"):
        assert dispatch.use_fused(x, "mxfp4", rounding="stochastic", key=key)
    with quantize_impl("xla"):
        monkeypatch.setattr(dispatch, "_single_device", lambda: True)
        assert not dispatch.use_fused(x, "mxfp8")


def test_auto_runs_stochastic_rounding_in_the_kernel(monkeypatch, kernel_calls):
    """"auto" on a simulated single GPU: mxfp4's four SR quantizations (dgrad dY, W; wgrad X, dY)
    run in the kernel with the bits of "xla" (nvfp4's SR dY: test_fused_matches_xla_bit_for_bit)."""
    real_available = dispatch.fused_available
    monkeypatch.setattr(dispatch, "fused_available",
                        lambda *a, require_gpu=True, **kw: real_available(*a, require_gpu=False, **kw))
    monkeypatch.setattr(dispatch, "_single_device", lambda: True)
    lhs, rhs, g = _inputs((64, 64), (64, 64), (64, 64), seed=11)
    want = _fwd_bwd("xla", "mxfp4", lhs, rhs, g)
    assert kernel_calls["fused"] == 0
    got = _fwd_bwd("auto", "mxfp4", lhs, rhs, g)
    assert kernel_calls["fused"] == 4
    _assert_same_bits(got, want)


@pytest.fixture
def cast_calls(monkeypatch):
    """Counts calls of the per-tensor FP8 cast(+transpose) kernel (at trace time)."""
    from lowbit.kernels import fp8_cast_pallas

    calls = []
    real = fp8_cast_pallas.fp8_cast

    def counted(x, fmt, **kwargs):
        calls.append((fmt, tuple(x.shape)))
        return real(x, fmt, **kwargs)

    monkeypatch.setattr(fp8_cast_pallas, "fp8_cast", counted)
    return calls


@pytest.mark.parametrize(("lhs_shape", "rhs_shape", "dims"), [
    ((64, 32), (32, 48), DIMS), ((2, 32, 64), (2, 64, 16), BATCHED_DIMS)])
def test_fp8_recipe_casts_both_layouts_in_one_kernel(cast_calls, lhs_shape, rhs_shape, dims):
    """fp8: X, W and dY each go through the cast(+transpose) kernel once, as stored (W [B, K, N], not
    its transpose); y and dX keep the bits of the XLA switch. dW (the wgrad on the kernel's transposed
    copies) is the same FP8 products, exact in float32, summed in another order: on the CPU, XLA runs
    that dot on a different path (contracting dim 0, which also has no bfloat16 x bfloat16 -> float32,
    hence float32 compute here), so it is held to the summation bound M·eps·Σ|x||dy| instead.
    """
    recipe = dataclasses.replace(lowbit.get_recipe("fp8"), compute_dtype="float32")
    out_shape = (*lhs_shape[:-1], rhs_shape[-1])
    lhs, rhs, g = _inputs(lhs_shape, rhs_shape, out_shape, seed=12)
    want = _fwd_bwd("xla", recipe, lhs, rhs, g, dims)
    assert cast_calls == []
    got = _fwd_bwd("fused", recipe, lhs, rhs, g, dims)
    batch = lhs_shape[:-2] or (1,)
    assert cast_calls == [("fp8", (*batch, *lhs_shape[-2:])), ("fp8", (*batch, *rhs_shape[-2:])),
                          ("fp8_e5m2", (*batch, *out_shape[-2:]))]
    _assert_same_bits(got[:2], want[:2])
    x_q = np.abs(np.asarray(lowbit.quantize(lhs, "fp8").dequantize(), np.float64))
    g_q = np.abs(np.asarray(lowbit.quantize(g, "fp8_e5m2").dequantize(), np.float64))
    bound = lhs_shape[-2] * np.finfo(np.float32).eps * np.einsum("...mk,...mn->...kn", x_q, g_q)
    assert np.all(np.abs(np.asarray(got[2], np.float64) - np.asarray(want[2], np.float64)) <= bound)
    assert np.abs(np.asarray(want[2])).max() > 0  # a real gradient, not two zeros


def test_fp8_cast_policy(monkeypatch, cast_calls):
    """Like the MX kernel: "auto" takes the cast kernel on a single GPU only, "xla" never; and only
    round-to-nearest per-tensor FP8 on float [..., M, N] arrays whose tiles are >= 16x16."""
    x = jnp.ones((64, 128), jnp.bfloat16)
    with quantize_impl("auto"):
        assert not dispatch.use_fp8_cast(x, "fp8")  # the CPU
        monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
        monkeypatch.setattr(dispatch, "_single_device", lambda: True)
        assert dispatch.use_fp8_cast(x, "fp8") and dispatch.use_fp8_cast(x, "fp8_e5m2")
        assert not dispatch.use_fp8_cast(x, "fp8", rounding="stochastic")
        assert not dispatch.use_fp8_cast(x, "mxfp8")
        assert not dispatch.use_fp8_cast(jnp.ones((8, 128)), "fp8")  # 8-row tiles: XLA's cast
        assert not dispatch.use_fp8_cast(jnp.ones((64, 128), jnp.int32), "fp8")
        assert not dispatch.use_fp8_cast(jnp.ones((128,)), "fp8")
        monkeypatch.setattr(dispatch, "_single_device", lambda: False)
        assert not dispatch.use_fp8_cast(x, "fp8")
    with quantize_impl("xla"):
        monkeypatch.setattr(dispatch, "_single_device", lambda: True)
        assert not dispatch.use_fp8_cast(x, "fp8")
    with quantize_impl("fused"):
        q, qt = dispatch.quantize_with_transpose(jnp.ones((8, 128)), "fp8")  # declined: XLA + transpose
        assert cast_calls == [] and qt.data.shape == (128, 8)
        np.testing.assert_array_equal(_bits(qt.data), _bits(q.data).T)
        with pytest.raises(ValueError, match="per-tensor formats.*quantize each layout"):
            dispatch.quantize_with_transpose(x, "mxfp8")


def test_switch_default_env_and_errors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert get_quantize_impl() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "XLA")
    assert get_quantize_impl() == "xla"
    with quantize_impl("fused"):
        assert get_quantize_impl() == "fused"  # explicit choice beats the environment
    assert get_quantize_impl() == "xla"  # and is undone on leaving the block
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="LOWBIT_QUANTIZE_IMPL") as err:
        get_quantize_impl()
    assert all(choice in str(err.value) for choice in QUANTIZE_IMPLS)
    with pytest.raises(ValueError, match=r"'auto', 'xla', 'fused'"):
        set_quantize_impl("pallas")
    with pytest.raises(ValueError, match="fused kernel does not take"):
        dispatch.quantize_fused_nd(jnp.ones((4, 48)), "mxfp8")


def test_emulated_gemms_take_block_values_from_the_kernel(monkeypatch):
    """On the emulate backend the operands used at once (fprop X and Wᵀ, dgrad dY, wgrad dYᵀ) come from the
    quantize kernel as BlockValues, the residuals (wgrad X, dgrad W), stored as QArrays, from the dequantize
    kernel; $LOWBIT_QUANTIZE_VALUES=0 makes all six QArrays; the bits of y, dx and dw are the same either way
    and equal to the XLA path's."""
    from lowbit import backends

    seen = []
    real = backends._GEMMS["emulate"]

    def spy(lhs, rhs, **kw):
        seen.append(tuple(type(op).__name__ for op in (lhs, rhs)))
        return real(lhs, rhs, **kw)

    monkeypatch.setitem(backends._GEMMS, "emulate", spy)
    lhs, rhs, g = _inputs((64, 64), (64, 32), (64, 32))
    want = _fwd_bwd("xla", "mxfp8", lhs, rhs, g)
    assert seen == [("QArray", "QArray")] * 3
    seen.clear()
    got = _fwd_bwd("fused", "mxfp8", lhs, rhs, g)
    assert seen == [("BlockValues", "BlockValues")] * 3  # fprop, dgrad, wgrad
    _assert_same_bits(got, want)
    seen.clear()
    monkeypatch.setenv(dispatch.VALUES_ENV_VAR, "0")
    codes = _fwd_bwd("fused", "mxfp8", lhs, rhs, g)
    assert seen == [("QArray", "QArray")] * 3
    _assert_same_bits(codes, want)
    monkeypatch.setenv(dispatch.VALUES_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"LOWBIT_QUANTIZE_VALUES='yes': set it to 1 .* or 0"):
        _fwd_bwd("fused", "mxfp8", lhs, rhs, g)
