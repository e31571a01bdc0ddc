"""The fused per-tensor FP8 cast(+transpose) kernel against lowbit.quantize, bit for bit (interpret mode)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit
from lowbit.formats import get_format
from lowbit.kernels.fp8_cast_pallas import fp8_cast
from tests.reference_np import fp8_midpoints


def _bits(a):
    return np.asarray(a).view(np.uint8)


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-12, 12, (shape[0], 1)))
    x = x.astype(np.float32)
    x[0, :6] = [0.0, -0.0, 1e-40, -3e-39, 2.0**7, -(2.0**7)]  # zeros, f32 subnormals, amax at a power of two
    return x


@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (48, 80)])  # 48x80: tiles of 16 rows, 16 columns
def test_bits_match_quantize_and_transpose(fmt, dtype, shape):
    x = jnp.asarray(_inputs(shape, 0), dtype)
    q, qt = fp8_cast(x, fmt, transpose=True, block=32, interpret=True)
    ref = lowbit.quantize(x, fmt)
    np.testing.assert_array_equal(_bits(q.data), _bits(ref.data))
    np.testing.assert_array_equal(_bits(qt.data), _bits(ref.data).T)
    assert float(q.tensor_scale) == float(ref.tensor_scale) == float(qt.tensor_scale)
    # and against ml_dtypes' own cast of the float64 scaled values (independent of lowbit.quantize)
    x64 = np.asarray(x, np.float64)
    x64 = np.where(np.abs(x64) < np.finfo(np.float32).tiny, np.copysign(0.0, x64), x64)  # signed flush
    elem = ml_dtypes.float8_e4m3fn if fmt == "fp8" else ml_dtypes.float8_e5m2
    top = float(ml_dtypes.finfo(elem).max)
    y = np.clip((x64.astype(np.float32) * np.float32(1.0 / float(q.tensor_scale))), -top, top)
    np.testing.assert_array_equal(_bits(q.data), y.astype(elem).view(np.uint8))


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 2, 32, 16)])
def test_batched_bits_one_scale_for_the_whole_tensor(shape):
    """[..., M, N]: leading dims are a grid axis; the scale is the amax of all of x (lowbit.quantize's),
    so a batch entry 2^10 larger than the others sets it, and q_t is swapaxes(-1, -2) of q."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1, *shape[-2:])[1] *= 1024.0
    x = jnp.asarray(x, jnp.bfloat16)
    q, qt = fp8_cast(x, "fp8_e5m2", transpose=True, block=16, interpret=True)
    ref = lowbit.quantize(x, "fp8_e5m2")
    assert q.data.shape == shape and qt.data.shape == (*shape[:-2], shape[-1], shape[-2])
    assert q.axis == qt.axis == ref.axis and float(q.tensor_scale) == float(ref.tensor_scale)
    np.testing.assert_array_equal(_bits(q.data), _bits(ref.data))
    np.testing.assert_array_equal(_bits(qt.data), np.swapaxes(_bits(ref.data), -1, -2))


@pytest.mark.parametrize("encode", ["integer", "convert", "magic"])
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
def test_every_midpoint_rounds_to_even(fmt, encode):
    """Ties to even, and one float32 ulp off a tie to the nearer neighbour (no double rounding through
    float16 or bfloat16): the codes are ml_dtypes' cast of the same float32 values, for both encoders."""
    x = fp8_midpoints(ml_dtypes.float8_e4m3fn if fmt == "fp8" else ml_dtypes.float8_e5m2)
    q, qt = fp8_cast(jnp.asarray(x), fmt, transpose=True, block=16, interpret=True, encode=encode)
    assert float(q.tensor_scale) == 1.0
    elem = ml_dtypes.float8_e4m3fn if fmt == "fp8" else ml_dtypes.float8_e5m2
    want = x.astype(elem).view(np.uint8)
    np.testing.assert_array_equal(_bits(q.data), want)
    np.testing.assert_array_equal(_bits(qt.data), want.T)


def test_prescale_and_no_transpose():
    x = jnp.asarray(_inputs((32, 64), 1))
    q, qt = fp8_cast(x, "fp8", prescale=0.75, interpret=True)
    assert qt is None
    np.testing.assert_array_equal(_bits(q.data), _bits(lowbit.quantize(x, "fp8", prescale=0.75).data))
    assert q.prescale == 0.75


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_poisons_the_tensor(bad):
    x = _inputs((32, 32), 2)
    x[3, 5] = bad
    q, qt = fp8_cast(jnp.asarray(x), "fp8", transpose=True, interpret=True)
    ref = lowbit.quantize(jnp.asarray(x), "fp8")
    assert np.isnan(float(q.tensor_scale)) and np.isnan(float(ref.tensor_scale))
    np.testing.assert_array_equal(_bits(q.data), _bits(ref.data))
    assert not _bits(qt.data).any()


def test_all_zero_tensor():
    q, _ = fp8_cast(jnp.zeros((16, 32), jnp.bfloat16), "fp8_e5m2", interpret=True)
    assert float(q.tensor_scale) == 1.0 and not _bits(q.data).any()


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="per-tensor.*lowbit.quantize"):
        fp8_cast(jnp.ones((16, 32)), "mxfp8", interpret=True)
    with pytest.raises(ValueError, match=r"rank >= 2 \(\[\.\.\., M, N\]\)"):
        fp8_cast(jnp.ones((32,)), "fp8", interpret=True)
    with pytest.raises(ValueError, match="encode must be one of"):
        fp8_cast(jnp.ones((16, 32)), "fp8", encode="fast", interpret=True)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        fp8_cast(jnp.ones((16, 32), jnp.int32), "fp8", interpret=True)
    with pytest.raises(ValueError, match="non-empty array.*lowbit.quantize"):
        fp8_cast(jnp.ones((0, 32)), "fp8", interpret=True)


def test_format_object_is_its_name():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((32, 64)), jnp.float32)
    by_name, _ = fp8_cast(x, "fp8_e5m2", interpret=True)
    by_object, _ = fp8_cast(x, get_format("fp8_e5m2"), interpret=True)
    np.testing.assert_array_equal(_bits(by_object.data), _bits(by_name.data))
    assert by_object.fmt == by_name.fmt


@pytest.mark.parametrize("cc, want", [(8.0, "magic"), (8.9, "magic"), (9.0, "convert"), (10.0, "convert")])
def test_auto_encode_takes_the_convert_only_where_it_is_exact(monkeypatch, cc, want):
    """Triton's float32 -> FP8 convert is one RNE cvt from sm_90 on; below it rounds via f16 (twice), so
    auto takes the magic add there (exact on any IEEE GPU), as it does for E2M1 everywhere."""
    from lowbit.kernels import fp8_cast_pallas, quantize_pallas

    monkeypatch.setattr(quantize_pallas, "_gpu_compute_capability", lambda: cc)
    x = jnp.ones((16, 32))
    assert fp8_cast_pallas._checked(x, "fp8", "auto", interpret=False)[2] == want
    assert fp8_cast_pallas._checked(x, "fp8", "auto", interpret=True)[2] == "convert"  # XLA's exact cast
    mxfp8 = get_format("mxfp8")
    assert quantize_pallas._resolve_encode("auto", mxfp8, "nearest", False) == want
    assert quantize_pallas._resolve_encode("auto", get_format("mxfp4"), "nearest", False) == "magic"
    assert quantize_pallas._resolve_encode("auto", mxfp8, "stochastic", False) == "integer"
    nvfp4 = get_format("nvfp4")
    want_scale = "convert" if cc >= 9 else "integer"
    assert quantize_pallas._resolve_scale_encode("auto", nvfp4, False) == want_scale
    # MX scales are E8M0 exponents: scale_encode does not apply, so no choice of it is refused
    assert quantize_pallas._resolve_scale_encode("convert", mxfp8, False) == "unused"
    if want == "magic":
        with pytest.raises(ValueError, match="sm_90.*'integer'"):
            fp8_cast_pallas._checked(x, "fp8", "convert", interpret=False)
        with pytest.raises(ValueError, match="sm_90.*'integer'"):
            quantize_pallas._resolve_encode("convert", mxfp8, "nearest", False)
        with pytest.raises(ValueError, match="sm_90.*'integer'"):
            quantize_pallas._resolve_scale_encode("convert", nvfp4, False)


def test_rectangular_tiles_give_the_same_bits():
    """block=(rows, cols) sets the two sides apart ((16, 32) against 16x16): same codes, both layouts."""
    from lowbit.kernels.fp8_cast_pallas import fp8_cast_scaled, tiles

    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 64, 96)), jnp.bfloat16)
    assert tiles(x.shape, (16, 32)) == (16, 32) and tiles(x.shape, (128, 8)) == (64, 8)
    square = fp8_cast_scaled(x, "fp8", jnp.float32(0.01), transpose=True, block=16, interpret=True)
    wide = fp8_cast_scaled(x, "fp8", jnp.float32(0.01), transpose=True, block=(16, 32), interpret=True)
    for a, b in zip(square[:2], wide[:2], strict=True):
        np.testing.assert_array_equal(_bits(a.data), _bits(b.data))
    assert float(square[2]) == float(wide[2])


# (2, 2, 32): tiles of 2 rows, too few for words: the unpacked store
@pytest.mark.parametrize("shape", [(2, 64, 96), (128, 48), (2, 2, 32)])
def test_packed_transposed_copy_gives_the_same_bits(shape):
    """pack_transpose: the transposed copy stored as int32 words of 4 row-consecutive codes is byte for byte
    the unpacked one (little-endian), as are the codes, the amax and the scale; NaN poisoning included."""
    from lowbit.kernels.fp8_cast_pallas import fp8_cast_scaled

    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    for xs in (x, np.where(np.arange(x.size).reshape(shape) == 5, np.nan, x)):
        for fn in (lambda a, k: fp8_cast(a, "fp8_e5m2", transpose=True, block=16, interpret=True,
                                          pack_transpose=k),
                   lambda a, k: fp8_cast_scaled(a, "fp8", jnp.float32(0.02), transpose=True, block=16,
                                                interpret=True, pack_transpose=k)):
            plain, packed = fn(jnp.asarray(xs), False), fn(jnp.asarray(xs), True)
            for a, b in zip(plain[:2], packed[:2], strict=True):
                assert a.data.shape == b.data.shape
                np.testing.assert_array_equal(_bits(a.data), _bits(b.data))
                np.testing.assert_array_equal(np.asarray(a.tensor_scale), np.asarray(b.tensor_scale))
            np.testing.assert_array_equal(_bits(plain[1].data), np.swapaxes(_bits(plain[0].data), -1, -2))
