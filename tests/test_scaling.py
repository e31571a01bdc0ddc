"""Delayed per-tensor scaling (lowbit.scaling): scales from amax histories, the scaled cast (XLA and
the Pallas kernel in interpret mode) against ml_dtypes, the custom VJP's history update, NNX/Linen glue."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import lowbit
import lowbit.linen
from lowbit.kernels.fp8_cast_pallas import fp8_cast_scaled
from lowbit.nn import AmaxHistory, QuantDotGeneral, update_amax_histories
from lowbit.scaling import (
    history_amax,
    init_history,
    next_history,
    quantize_scaled,
    scale_from_amax,
    tensor_amax,
    updated_history,
)

ELEMS = {"fp8": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
DIMS = (((1,), (0,)), ((), ()))
F32_TINY = float(np.finfo(np.float32).tiny)


def delayed(name="fp8", **changes):
    return lowbit.get_recipe(name).replace(name=f"{name}-d", scaling="delayed", **changes)


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, (*shape[:-1], 1)))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :6] = [0.0, -0.0, 1e-40, -3e-39, 2.0**7, -(2.0**7)]  # zeros, f32 subnormals, power-of-two amax
    return x


def ref_quantize_scaled(x, fmt, scale, prescale=1.0):
    """NumPy/ml_dtypes reference: codes of RNE(clip(flush(x) * fl32(1/s) * p, +-max)); NaN/Inf -> 0."""
    elem = ELEMS[fmt]
    x32 = np.asarray(x, np.float32)
    x32 = np.where(np.abs(x32) < F32_TINY, np.copysign(np.float32(0), x32), x32)
    finite = np.isfinite(x32)
    recip = np.float32(1.0 / np.float64(np.float32(scale)))  # correctly rounded float32 reciprocal
    y = np.where(finite, x32, np.float32(0)) * recip
    if prescale != 1.0:
        y = y * np.float32(prescale)
    top = np.float32(ml_dtypes.finfo(elem).max)
    codes = np.clip(y, -top, top).astype(elem).view(np.uint8)
    amax = np.float32(np.max(np.where(finite, np.abs(x32), 0), initial=0))
    return codes, amax, not finite.all()


# ----------------------------------------------------------------------------- scale and history math
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
def test_scale_from_amax_matches_float64_division(fmt):
    top = float(ml_dtypes.finfo(ELEMS[fmt]).max)
    amaxes = np.array([3.7, 448.0, 2.0**-3, 1e-30, 0.0, np.inf, np.nan, 57344.0], np.float32)
    got = np.asarray(jax.vmap(lambda a: scale_from_amax(a, fmt))(jnp.asarray(amaxes)))
    want = np.float32(np.float64(amaxes) / top)  # float64 then one rounding: the correctly rounded quotient
    want = np.maximum(want, np.float32(F32_TINY))
    want = np.where((amaxes > 0) & np.isfinite(amaxes), want, np.float32(1.0))  # empty / bad history: 1
    np.testing.assert_array_equal(got, want)


def test_history_roll_and_amax_algorithms():
    h = init_history(4)
    assert h.shape == (3, 4) and h.dtype == jnp.float32 and not h.any()
    h = updated_history(h, jnp.array([1.0, 2.0, 3.0]))
    h = updated_history(h, jnp.array([5.0, 0.5, 0.25]))
    np.testing.assert_array_equal(np.asarray(h), [[5, 1, 0, 0], [0.5, 2, 0, 0], [0.25, 3, 0, 0]])
    assert float(history_amax(h[1], "max")) == 2.0 and float(history_amax(h[1], "most_recent")) == 0.5
    with pytest.raises(ValueError, match="amax_compute_algo"):
        history_amax(h[0], "mean")
    # the oldest entry drops out after H steps
    for _ in range(3):
        h = updated_history(h, jnp.zeros(3))
    assert float(jnp.max(h)) == 5.0
    assert float(jnp.max(updated_history(h, jnp.zeros(3)))) == 0.0


def test_next_history_reads_only_column_zero_of_the_gradient():
    old = updated_history(init_history(3), jnp.array([4.0, 2.0, 1.0]))
    single = updated_history(old, jnp.array([3.0, 1.0, 0.5]))  # what one use's VJP returns
    np.testing.assert_array_equal(np.asarray(next_history(old, single)), np.asarray(single))
    # a hook used twice: autodiff sums the two gradients; old columns must not double
    twice = single + updated_history(old, jnp.array([6.0, 1.5, 0.25]))
    got = np.asarray(next_history(old, twice))
    np.testing.assert_array_equal(got[:, 0], [9.0, 2.5, 0.75])  # the sum of the amaxes (>= their max)
    np.testing.assert_array_equal(got[:, 1:], np.asarray(old)[:, :-1])
    # a hook that did not run: an all-zero gradient keeps the history
    np.testing.assert_array_equal(np.asarray(next_history(old, jnp.zeros_like(old))), np.asarray(old))


# ----------------------------------------------------------------------------- the scaled cast
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("factor", [0.125, 1.0, 4.0])  # saturating, exact, headroom
@pytest.mark.parametrize("prescale", [1.0, 0.75])
def test_quantize_scaled_matches_ml_dtypes(fmt, factor, prescale):
    x = _inputs((24, 40), 1)
    top = float(ml_dtypes.finfo(ELEMS[fmt]).max)
    scale = np.float32(np.abs(x).max() / top * factor)
    q, amax = quantize_scaled(jnp.asarray(x), fmt, scale, prescale=prescale)
    codes, ref_amax, _ = ref_quantize_scaled(x, fmt, scale, prescale)
    np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), codes)
    assert float(amax) == float(ref_amax) > 0
    assert float(q.tensor_scale) == float(scale) and q.prescale == prescale
    if factor < 1:  # values beyond the delayed range saturate at the format's max, never NaN/Inf
        assert np.abs(np.asarray(q.data, np.float32)).max() == top
    deq = np.asarray(q.dequantize())
    assert np.isfinite(deq).all()


def test_quantize_scaled_nonfinite_poisons_the_scale_not_the_amax():
    x = _inputs((16, 32), 2)
    x[3, 4], x[5, 6] = np.nan, -np.inf
    q, amax = quantize_scaled(jnp.asarray(x), "fp8", 0.5)
    codes, ref_amax, bad = ref_quantize_scaled(x, "fp8", 0.5)
    assert bad and np.isnan(float(q.tensor_scale))
    np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), codes)
    assert codes[3, 4] == 0 and codes[5, 6] == 0
    assert float(amax) == float(ref_amax) and np.isfinite(float(amax))
    assert np.isnan(np.asarray(q.dequantize())).all()  # as current scaling: a NaN tensor, not a silent one


def test_quantize_scaled_rejects_block_formats_and_integer_input():
    with pytest.raises(ValueError, match="per-tensor formats"):
        quantize_scaled(jnp.ones((4, 32)), "mxfp8", 1.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_scaled(jnp.ones((4, 32), jnp.int32), "fp8", 1.0)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("encode", ["convert", "integer"])
@pytest.mark.parametrize("shape", [(2, 32, 64), (48, 80)])
def test_fp8_cast_scaled_kernel_matches_quantize_scaled(fmt, encode, shape):
    x = _inputs(shape, 3)
    x.reshape(-1, shape[-1])[2, 1] = np.nan
    for poison in (False, True):
        xin = np.nan_to_num(x, nan=1.5) if not poison else x
        for factor, prescale in ((0.25, 1.0), (2.0, 0.75)):
            scale = jnp.float32(np.nanmax(np.abs(xin)) / float(ml_dtypes.finfo(ELEMS[fmt]).max) * factor)
            q, qt, amax = fp8_cast_scaled(jnp.asarray(xin, jnp.bfloat16), fmt, scale, transpose=True,
                                          prescale=prescale, block=32, interpret=True, encode=encode)
            ref, ref_amax = quantize_scaled(jnp.asarray(xin, jnp.bfloat16), fmt, scale, prescale=prescale)
            want = np.asarray(ref.data).view(np.uint8)
            np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), want)
            np.testing.assert_array_equal(np.asarray(qt.data).view(np.uint8), np.swapaxes(want, -1, -2))
            assert float(amax) == float(ref_amax)
            np.testing.assert_array_equal(np.asarray(q.tensor_scale), np.asarray(ref.tensor_scale))
            assert np.isnan(float(q.tensor_scale)) == poison


# ----------------------------------------------------------------------------- the quantized GEMMs
def _operands(seed=0, m=64, k=128, n=96):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
    dy = jax.random.normal(kd, (m, n), jnp.float32) * 1e-3
    return x, w, dy


def _np_amax(a):
    return np.float32(np.abs(np.asarray(a, np.float32)).max())


def test_delayed_dot_with_the_current_amax_is_current_scaling_bit_for_bit():
    """A history whose newest entry is each tensor's own amax gives exactly current scaling's scales,
    so y, dX and dW must equal the fp8 recipe's bit for bit; the history's gradient is the rolled
    history with the three amaxes (computed here by NumPy) in front."""
    x, w, dy = _operands()
    rd, rc = delayed(amax_history_len=4, amax_compute_algo="most_recent"), lowbit.get_recipe("fp8")
    amaxes = np.array([_np_amax(x), _np_amax(w), _np_amax(dy)])
    old = init_history(4).at[:, 1].set(7.0)
    h = updated_history(old, jnp.asarray(amaxes))
    y_c, vjp_c = jax.vjp(lambda a, b: lowbit.dot_general(rc)(a, b, DIMS), x, w)
    y_d, vjp_d = jax.vjp(lambda a, b, c: lowbit.dot_general(rd)(a, b, DIMS, amax_history=c), x, w, h)
    (dx_c, dw_c), (dx_d, dw_d, h_grad) = vjp_c(dy), vjp_d(dy)
    for a, b in ((y_c, y_d), (dx_c, dx_d), (dw_c, dw_d)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(h_grad), np.asarray(updated_history(h, jnp.asarray(amaxes))))


def test_delayed_ragged_dot_with_the_current_amax_is_current_scaling_bit_for_bit():
    x, _, dy = _operands(1)
    w = jax.random.normal(jax.random.key(9), (3, 128, 96)) * 0.05
    gs = jnp.array([20, 30, 14], jnp.int32)
    rd, rc = delayed(amax_history_len=2, amax_compute_algo="most_recent"), lowbit.get_recipe("fp8")
    amaxes = jnp.asarray([_np_amax(x), _np_amax(w), _np_amax(dy)])
    h = updated_history(init_history(2), amaxes)
    for impl in ("xla", "pallas"):
        y_c, vjp_c = jax.vjp(lambda a, b, i=impl: lowbit.ragged_dot(a, b, gs, rc, impl=i), x, w)
        y_d, vjp_d = jax.vjp(lambda a, b, c, i=impl: lowbit.ragged_dot(a, b, gs, rd, impl=i, amax_history=c),
                             x, w, h)
        (dx_c, dw_c), (dx_d, dw_d, h_grad) = vjp_c(dy), vjp_d(dy)
        for a, b in ((y_c, y_d), (dx_c, dx_d), (dw_c, dw_d)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(h_grad), np.asarray(updated_history(h, amaxes)))


def test_delayed_dot_uses_the_history_max_and_saturates_beyond_it():
    """amax_compute_algo max: the scale comes from the largest entry, here a quarter of X's amax, so
    X saturates; y must equal the GEMM of the NumPy-quantized operands, computed in float64."""
    x, w, _ = _operands(2)
    r = delayed(amax_history_len=3, compute_dtype="float32", backend="emulate")
    ax, aw = _np_amax(x) / 4, _np_amax(w) * 2
    h = init_history(3).at[0, 2].set(ax).at[0, 0].set(ax / 8).at[1, 1].set(aw).at[2, 0].set(1.0)
    y = np.asarray(lowbit.dot_general(r)(x, w, DIMS, amax_history=h), np.float64)
    sx, sw = np.float32(np.float64(ax) / 448), np.float32(np.float64(aw) / 448)
    cx, _, _ = ref_quantize_scaled(np.asarray(x), "fp8", sx)
    cw, _, _ = ref_quantize_scaled(np.asarray(w), "fp8", sw)
    vx = cx.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * sx
    vw = cw.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * sw
    assert (np.abs(cx.view(ml_dtypes.float8_e4m3fn).astype(np.float32)) == 448).sum() > 10  # saturated
    np.testing.assert_allclose(y, vx @ vw, rtol=1e-5, atol=1e-5 * np.abs(vx @ vw).max())


def test_delayed_errors_name_the_fix():
    x, w, _ = _operands()
    with pytest.raises(ValueError, match=r"delayed scaling and needs its amax history: pass amax_history"):
        lowbit.dot_general(delayed())(x, w, DIMS)
    with pytest.raises(ValueError, match=r"amax_history must be float32\[3, 16\]"):
        lowbit.dot_general(delayed())(x, w, DIMS, amax_history=jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="uses current scaling"):
        lowbit.dot_general("fp8")(x, w, DIMS, amax_history=init_history(16))
    with pytest.raises(ValueError, match="needs its amax history"):
        lowbit.ragged_dot(x, w[None], jnp.array([64]), delayed())
    with pytest.raises(ValueError, match="applies to per-tensor formats"):
        delayed("mxfp8")
    fp8 = lowbit.get_recipe("fp8")
    with pytest.raises(ValueError, match="random Hadamard transform and a per-tensor operand"):
        fp8.replace(scaling="delayed", fprop=fp8.fprop.__class__(fp8.fprop.lhs, fp8.fprop.rhs, 16))
    with pytest.raises(ValueError, match="amax_history_len"):
        delayed(amax_history_len=0)
    with pytest.raises(ValueError, match="amax_compute_algo"):
        delayed(amax_compute_algo="mean")
    with pytest.raises(ValueError, match="scaling"):
        fp8.replace(scaling="just-in-time")


def test_shipped_fp8_delayed_recipe_round_trips_yaml(tmp_path):
    r = lowbit.get_recipe("fp8-delayed")
    assert r.delayed and r.amax_history_len == 16 and r.amax_compute_algo == "max"
    assert r.passes == lowbit.get_recipe("fp8").passes  # the fp8 recipe's formats, only scaled differently
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert lowbit.get_recipe(str(path)) == r
    assert "delayed scaling" in r.summary()


# ----------------------------------------------------------------------------- NNX and Linen glue
def test_nnx_module_history_follows_the_amaxes_of_each_step():
    r = delayed(amax_history_len=3)
    lin = nnx.Linear(32, 16, rngs=nnx.Rngs(0), dot_general=QuantDotGeneral(r))
    assert isinstance(lin.dot_general.amax_history, AmaxHistory)

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    grad = nnx.grad(loss, argnums=nnx.DiffState(0, (nnx.Param, AmaxHistory)))
    xs = [jax.random.normal(jax.random.key(i), (8, 32)) * (i + 1) for i in range(2)]
    for x in xs:
        update_amax_histories(lin, grad(lin, x))
    h = np.asarray(lin.dot_general.amax_history[...])
    np.testing.assert_array_equal(h[0, :2], [_np_amax(xs[1]), _np_amax(xs[0])])  # X amaxes, newest first
    np.testing.assert_array_equal(h[1, :2], 2 * [_np_amax(lin.kernel[...])])  # W did not change
    assert h[2, 0] > 0 and h[2, 1] > 0 and (h[:, 2] == 0).all()


def test_nnx_hook_used_twice_records_the_sum_of_its_amaxes():
    r = delayed(amax_history_len=2)
    hook = QuantDotGeneral(r)
    w = nnx.Param(jax.random.normal(jax.random.key(0), (16, 16)) * 0.1)

    class Twice(nnx.Module):
        def __init__(self):
            self.w, self.hook = w, hook

        def __call__(self, x):
            return self.hook(self.hook(x, self.w[...], DIMS), self.w[...], DIMS)

    m = Twice()
    x = jax.random.normal(jax.random.key(1), (4, 16))
    grads = nnx.grad(lambda m, x: jnp.sum(m(x)), argnums=nnx.DiffState(0, (nnx.Param, AmaxHistory)))(m, x)
    update_amax_histories(m, grads)
    h = np.asarray(m.hook.amax_history[...])
    first = lowbit.dot_general(r)(x, w[...], DIMS, amax_history=init_history(2))  # the second call's input
    np.testing.assert_allclose(h[0, 0], _np_amax(x) + _np_amax(first), rtol=0)
    assert h[1, 0] == 2 * _np_amax(w[...]) and (h[:, 1] == 0).all()


def test_linen_history_is_overwritten_by_flax_train_state():
    r = delayed(amax_history_len=3)
    dense = nn.Dense(16, dot_general_cls=functools.partial(lowbit.linen.QuantDotGeneral, recipe=r))
    x = jax.random.normal(jax.random.key(1), (8, 32)) * 3
    variables = dense.init(jax.random.key(0), x)
    meta = variables[lowbit.linen.OVERWRITE_WITH_GRADIENT]
    assert meta["QuantDotGeneral_0"]["amax_history"].shape == (3, 3)
    state = train_state.TrainState.create(apply_fn=dense.apply, params=variables, tx=optax.sgd(0.1))
    grads = jax.grad(lambda p: jnp.sum(dense.apply(p, x) ** 2))(state.params)
    state = state.apply_gradients(grads=grads)
    h = np.asarray(state.params[lowbit.linen.OVERWRITE_WITH_GRADIENT]["QuantDotGeneral_0"]["amax_history"])
    assert h[0, 0] == _np_amax(x) and h[1, 0] == _np_amax(variables["params"]["kernel"])
    assert (h[:, 1:] == 0).all()


def test_tensor_amax_ignores_nonfinite_and_subnormals():
    x = jnp.array([1e-40, -2.5, np.nan, np.inf, 2.0], jnp.float32)
    amax, bad = tensor_amax(x)
    assert float(amax) == 2.5 and bool(bad)
    amax, bad = tensor_amax(jnp.array([3e-39, -1e-39], jnp.float32))
    assert float(amax) == 0.0 and not bool(bad)
