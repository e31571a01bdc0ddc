"""The fused Pallas quantization kernel (interpret mode on CPU) held bit for bit to lowbit.quantize and to
the plain-NumPy reference (tests/reference_np.py), for nearest and stochastic rounding (SR: u from the
counter hash of each element's flat index, NumPy spec in tests/test_quantize.py); SR also checked for
unbiasedness; unsupported calls are refused with a pointer to lowbit.quantize.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from tests.reference_np import ref_quantize
from tests.test_quantize import np_sr_uniform


def _interpret_mode_works() -> str | None:
    """None if a trivial Pallas kernel runs in interpret mode here, else why not."""
    try:
        from jax.experimental import pallas as pl

        def copy(x_ref, o_ref):
            o_ref[...] = x_ref[...] + 1.0

        out = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                             interpret=True)(jnp.zeros((8,), jnp.float32))
        return None if float(out[0]) == 1.0 else "interpret mode gave a wrong result"
    except Exception as e:  # noqa: BLE001 - any failure means: no interpret mode on this jax
        return f"Pallas interpret mode unavailable on jax {jax.__version__}: {type(e).__name__}: {e}"


_WHY_NOT = _interpret_mode_works()
if _WHY_NOT is not None:
    pytest.skip(_WHY_NOT, allow_module_level=True)

from lowbit.kernels import fused_available, quantize_fused  # noqa: E402
from lowbit.quantize import BlockValues  # noqa: E402


def _bits(a) -> np.ndarray:
    """Raw bits: one uint8 per element for 8-bit and FP4 (code in the low nibble), uint32 for f32."""
    if a.dtype == jnp.float4_e2m1fn:
        return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint4)).astype(np.uint8)
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def _edge_input(dtype) -> np.ndarray:
    """Random rows plus zeros, NaN/Inf blocks, powers of two, element maxima, huge, tiny and
    float32-subnormal rows, and exact E2M1/E4M3 midpoints (ties) after scaling (64 x 256)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * 3).astype(np.float32)
    x[0] = 0.0
    x[0, 7] = -0.0
    x[1, :32] = 448.0 * 2.0**7
    x[2, 5] = np.nan
    x[3, 40] = -np.inf
    x[4] = 2.0 ** rng.integers(-126, 128, 256)
    x[5] = 1e-40 * np.sign(rng.standard_normal(256))  # f32 subnormal: flushed
    x[6] *= 1e30
    x[7] *= 1e-36
    x[8] = rng.standard_t(1.5, 256)
    x[9] = np.tile([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], 32) * np.where(np.arange(256) % 3, 1, -1)
    x[10] = np.tile([448.0, 464.0, 0.5 * 2.0**-9, 1.5 * 2.0**-9, 2.0**-6, 2.0**-7], 43)[:256]
    x[11] = 1e-38 * rng.standard_normal(256)  # mixes normal and subnormal f32 in one block
    x[12:20] *= np.exp2(rng.integers(-60, 60, (8, 256)))
    return x.astype(dtype)


# (format, fused kwargs, lowbit.quantize kwargs, input dtype); each checked against both references.
CASES = [
    ("mxfp8", {}, {}, np.float32),
    ("mxfp8", {}, {}, jnp.bfloat16),
    ("mxfp8", {"scale_mode": "rceil"}, {"scale_mode": "rceil"}, np.float32),
    ("mxfp8_e5m2", {}, {}, np.float32),
    ("mxfp4", {}, {}, np.float32),
    ("mxfp4", {"scale_mode": "rceil", "fp4_layout": "codes"}, {"scale_mode": "rceil"}, np.float32),
    ("mxfp4", {"prescale": 0.75}, {"prescale": 0.75}, np.float16),
    ("nvfp4", {}, {}, np.float32),
    ("nvfp4", {"axis": (0, 1)}, {"axis": (0, 1)}, jnp.bfloat16),
    ("mxfp8", {"axis": (-2, -1), "block_rows": 64, "block_cols": 64}, {"axis": (-2, -1)}, np.float32),
    ("mxfp8_e5m2", {"encode": "magic"}, {}, np.float32),
    ("mxfp4", {"encode": "magic"}, {}, np.float32),
    ("nvfp4", {"encode": "magic", "scale_encode": "integer"}, {}, np.float32),
    ("nvfp4", {"scale_encode": "convert", "fp4_layout": "codes"}, {}, jnp.bfloat16),
    # both stores, whichever is the default: int32 words of 4 FP8 / 8 packed FP4 / 4 unpacked FP4 codes
    ("mxfp8", {"store": "words"}, {}, jnp.bfloat16),
    ("mxfp8", {"store": "bytes"}, {}, jnp.bfloat16),
    ("mxfp8_e5m2", {"store": "words", "encode": "magic"}, {}, np.float32),
    ("mxfp4", {"store": "words"}, {}, np.float32),
    ("mxfp4", {"store": "bytes"}, {}, np.float32),
    ("mxfp4", {"store": "words", "fp4_layout": "codes", "scale_mode": "rceil"}, {"scale_mode": "rceil"},
     jnp.bfloat16),
    ("nvfp4", {"store": "words"}, {}, jnp.bfloat16),
    ("nvfp4", {"store": "bytes"}, {}, jnp.bfloat16),
    ("nvfp4", {"store": "words", "axis": (0, 1)}, {"axis": (0, 1)}, np.float32),
    ("mxfp8", {"store": "words", "axis": (-2, -1), "block_rows": 64, "block_cols": 64}, {"axis": (-2, -1)},
     np.float32),
]


def _case_id(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={w}" for k, w in v.items()) or "-"
    return v if isinstance(v, str) else np.dtype(v).name


@pytest.mark.parametrize(("name", "fused_kw", "ref_kw", "dtype"), CASES, ids=_case_id)
def test_nearest_is_bit_exact(name, fused_kw, ref_kw, dtype):
    with np.errstate(over="ignore"):  # float16: the huge rows become Inf blocks (also an edge case)
        x = np.asarray(jnp.asarray(_edge_input(np.float32).astype(dtype)))
    q = quantize_fused(jnp.asarray(x), name, interpret=True, **fused_kw)
    want = lowbit.quantize(jnp.asarray(x), name, **ref_kw)
    ref = ref_quantize(np.asarray(x, np.float32), name, **ref_kw)

    assert q.data.dtype == want.data.dtype and q.data.shape == x.shape
    assert q.scale.dtype == want.scale.dtype and q.scale.shape == want.scale.shape
    assert q.axis == want.axis and q.prescale == want.prescale and q.fmt == want.fmt
    np.testing.assert_array_equal(_bits(q.data), _bits(want.data))
    np.testing.assert_array_equal(_bits(q.scale), _bits(want.scale))
    np.testing.assert_array_equal(_bits(q.data), ref.data_bits)  # independent NumPy spec
    np.testing.assert_array_equal(_bits(q.scale), ref.scale_bits)
    if name == "nvfp4":
        assert _bits(q.tensor_scale) == _bits(want.tensor_scale)
        assert np.float32(q.tensor_scale) == ref.tensor_scale
    else:
        assert q.tensor_scale is None


# (format, fused kwargs, lowbit.quantize kwargs, input dtype) for stochastic rounding.
SR_CASES = [
    ("mxfp8", {}, {}, np.float32),
    ("mxfp8", {"scale_mode": "rceil"}, {"scale_mode": "rceil"}, jnp.bfloat16),
    ("mxfp4", {"prescale": 0.75}, {"prescale": 0.75}, jnp.bfloat16),
    ("mxfp4", {"fp4_layout": "codes"}, {}, np.float32),
    ("nvfp4", {}, {}, np.float32),
    ("nvfp4", {"axis": (0, 1)}, {"axis": (0, 1)}, jnp.bfloat16),
    ("mxfp8", {"axis": (-2, -1), "block_rows": 64, "block_cols": 64}, {"axis": (-2, -1)}, np.float32),
    # the flat index of each code inside a stored word (the SR hash's input) for both stores
    ("mxfp4", {"store": "words"}, {}, np.float32),
    ("mxfp4", {"store": "bytes"}, {}, np.float32),
    ("mxfp4", {"store": "words", "fp4_layout": "codes"}, {}, jnp.bfloat16),
    ("mxfp8", {"store": "words"}, {}, np.float32),
    ("nvfp4", {"store": "words", "axis": (0, 1)}, {"axis": (0, 1)}, jnp.bfloat16),
]


@pytest.mark.parametrize(("name", "fused_kw", "ref_kw", "dtype"), SR_CASES, ids=_case_id)
def test_stochastic_is_bit_exact(name, fused_kw, ref_kw, dtype):
    """Kernel SR == lowbit.quantize SR bit for bit (same hashed u per element, every tile layout),
    and == the NumPy reference rounding with the NumPy hash's u."""
    x = _edge_input(np.float32)
    # NVFP4's one tensor scale follows the 1e30 row and the 2^±60 and 2^127 rows, which would leave
    # every other block at 0: moderate magnitudes there keep the edge rows and exercise SR everywhere.
    rng = np.random.default_rng(1)
    x[4] = 2.0 ** rng.integers(-20, 20, 256)
    x[6] *= 1e-28
    x[12:20] = 3 * rng.standard_normal((8, 256))
    x = np.asarray(jnp.asarray(x.astype(dtype)))
    key = jax.random.key(11)
    q = quantize_fused(jnp.asarray(x), name, rounding="stochastic", key=key, interpret=True, **fused_kw)
    want = lowbit.quantize(jnp.asarray(x), name, rounding="stochastic", key=key, **ref_kw)
    np.testing.assert_array_equal(_bits(q.data), _bits(want.data))
    np.testing.assert_array_equal(_bits(q.scale), _bits(want.scale))
    ref = ref_quantize(np.asarray(x, np.float32), name, u=np_sr_uniform(key, x.shape), **ref_kw)
    got = np.asarray(q.data).astype(np.float64)
    np.testing.assert_array_equal(got, ref.data)  # values: the sign of an SR zero is unspecified
    rne = ref_quantize(np.asarray(x, np.float32), name, **ref_kw)
    assert np.mean(got != rne.data) > 0.1  # SR really drew other values than RNE


@pytest.mark.parametrize(("name", "axis"), [("mxfp4", -1), ("nvfp4", (1, 2))])
def test_stochastic_with_leading_batch_dims_is_bit_exact(name, axis):
    """[B, rows, K] folded into the [B * rows, K] matrix: the kernel's flat index is x's own."""
    from lowbit.kernels.dispatch import quantize_fused_nd

    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 32, 64)).astype(np.float32))
    key = jax.random.key(12)
    q = quantize_fused_nd(x, name, axis, "stochastic", key)
    want = lowbit.quantize(x, name, axis, "stochastic", key)
    assert q.data.shape == want.data.shape and q.scale.shape == want.scale.shape
    np.testing.assert_array_equal(_bits(q.data), _bits(want.data))
    np.testing.assert_array_equal(_bits(q.scale), _bits(want.scale))


def test_stochastic_hash_is_unbiased_and_keyed():
    """E[q] = x with the in-kernel hashed u; the same key repeats, another key differs."""
    # One 6.0 per block fixes the MX scale at 2^0, so elements keep their value: 2.3 lies 30% of
    # the way from 2 to 3 on the E2M1 grid, -0.7 lies 40% of the way from -0.5 to -1.0.
    x = np.full((128, 256), 2.3, np.float32)
    x[:, 128:] = -0.7
    x[:, ::32] = 6.0
    x = jnp.asarray(x)
    keep = np.ones(x.shape, bool)
    keep[:, ::32] = False

    def qdq(key):
        q = quantize_fused(x, "mxfp4", rounding="stochastic", key=key, interpret=True)
        return np.asarray(lowbit.dequantize(q)), _bits(q.data)

    (v1, b1), (v1_again, b1_again), (v2, b2) = (qdq(jax.random.key(k)) for k in (7, 7, 8))
    np.testing.assert_array_equal(b1, b1_again)
    assert (b1 != b2).mean() > 0.2  # fresh key, fresh rounding decisions
    for v in (v1, v2):
        for cols, value, low, high in ((slice(0, 128), 2.3, 2.0, 3.0), (slice(128, 256), -0.7, -0.5, -1.0)):
            got = v[:, cols][keep[:, cols]]
            assert set(np.unique(got)) <= {low, high}
            # 124 x 128 draws per half: the mean's sd is <= 0.5 / sqrt(15872) ~ 0.004; allow 5 sd
            assert abs(got.mean() - value) < 0.02, (value, got.mean())
            # every quarter of the rows rounds up at the same rate (no stuck or repeating stream)
            for part in np.array_split(got.reshape(128, -1), 4):
                assert abs(part.mean() - value) < 0.04


def test_agrees_under_outer_jit():
    x = jnp.asarray(_edge_input(np.float32)[:32, :64])
    eager = quantize_fused(x, "mxfp8", interpret=True)
    jitted = jax.jit(lambda v: quantize_fused(v, "mxfp8", interpret=True))(x)
    np.testing.assert_array_equal(_bits(jitted.data), _bits(lowbit.quantize(x, "mxfp8").data))
    np.testing.assert_array_equal(_bits(jitted.scale), _bits(eager.scale))


@pytest.mark.parametrize(
    ("shape", "dtype", "fmt", "kw"),
    [
        ((4, 8, 32), jnp.float32, "mxfp8", {}),  # 3-D
        ((8, 48), jnp.float32, "mxfp8", {}),  # 48 not a multiple of 32
        ((64, 32), jnp.float32, "mxfp8", {"axis": 0}),  # blocks along rows
        ((8, 64), jnp.float32, "mxfp6_e2m3", {}),  # FP6 lives in an FP8 container: XLA path
        ((8, 64), jnp.float32, "fp8", {}),  # per-tensor stays XLA
        ((8, 64), jnp.int32, "mxfp8", {}),
        ((8, 64), jnp.float32, "mxfp8", {"scale_mode": "ceil"}),
    ],
)
def test_unsupported_calls_are_refused(shape, dtype, fmt, kw):
    x = jnp.zeros(shape, dtype)
    assert not fused_available(x, fmt, **kw, require_gpu=False)
    with pytest.raises(ValueError, match="lowbit.quantize|scale_mode"):
        quantize_fused(x, fmt, interpret=True, **kw)


def test_padding_is_left_to_the_xla_path():
    assert not fused_available(jnp.zeros((8, 64)), "mxfp8", pad=True, require_gpu=False)


def test_available_and_argument_errors():
    x = jnp.zeros((32, 64), jnp.bfloat16)
    assert fused_available(x, "mxfp8", require_gpu=False)
    assert fused_available(x, "nvfp4", axis=(0, 1), require_gpu=False)
    assert not fused_available(jnp.zeros((24, 64)), "nvfp4", axis=(0, 1), require_gpu=False)
    if jax.default_backend() != "gpu":
        assert not fused_available(x, "mxfp8")  # the compiled kernel needs a GPU
    with pytest.raises(ValueError, match="key="):
        quantize_fused(x, "mxfp8", rounding="stochastic", interpret=True)
    with pytest.raises(ValueError, match="rounding"):
        quantize_fused(x, "mxfp8", rounding="up", interpret=True)
    with pytest.raises(ValueError, match="div"):
        quantize_fused(x, "nvfp4", div="fast")
    with pytest.raises(ValueError,
                       match=r"unknown store 'int64'; choose one of \('auto', 'words', 'bytes'\)"):
        quantize_fused(x, "mxfp4", store="int64")


def test_store_from_the_environment(monkeypatch):
    """$LOWBIT_QUANTIZE_STORE picks auto's store (same bits); a wrong value is refused, naming the fix."""
    from lowbit.kernels import quantize_pallas

    x = jnp.asarray(_edge_input(np.float32)[:32, :64])
    want = _bits(quantize_fused(x, "mxfp4", store="bytes", interpret=True).data)
    for value in ("words", "BYTES", ""):
        monkeypatch.setenv(quantize_pallas.STORE_ENV_VAR, value)
        for fmt, default in (("mxfp4", "words"), ("nvfp4", "words"), ("mxfp8", "bytes")):
            got = quantize_pallas._resolve_store("auto", lowbit.get_format(fmt))
            assert got == (value.lower() or default), (value, fmt, got)
        np.testing.assert_array_equal(_bits(quantize_fused(x, "mxfp4", interpret=True).data), want)
    assert quantize_pallas._resolve_store("bytes", lowbit.get_format("mxfp4")) == "bytes"  # explicit wins
    monkeypatch.setenv(quantize_pallas.STORE_ENV_VAR, "int64")
    with pytest.raises(ValueError, match=r"LOWBIT_QUANTIZE_STORE='int64' is not a store; set it to one of"):
        quantize_fused(x, "mxfp4", interpret=True)
    with pytest.raises(ValueError, match="unknown format"):
        quantize_fused(x, "mxfp3")


@pytest.mark.parametrize("encode", ["integer", "convert", "magic"])
@pytest.mark.parametrize(("fmt", "elem"), [("mxfp8", "float8_e4m3fn"), ("mxfp8_e5m2", "float8_e5m2")])
def test_mxfp8_every_midpoint_rounds_to_even(fmt, elem, encode):
    """Both encoders on every FP8 midpoint +-1 float32 ulp: each block of 32 holds the element maximum,
    so its E8M0 scale is 2^0 and the codes are ml_dtypes' RNE cast of the values themselves."""
    import ml_dtypes

    from tests.reference_np import elem_max, fp8_midpoints

    elem = getattr(ml_dtypes, elem)
    vals = fp8_midpoints(elem).ravel()
    vals = vals[np.abs(vals) < elem_max(elem)]
    blocks = np.resize(vals, (-(-vals.size // 31), 31))
    x = np.concatenate([np.full((blocks.shape[0], 1), elem_max(elem), np.float32), blocks], axis=1)
    x = np.resize(x, (-(-x.shape[0] // 8) * 8, 32)).reshape(-1, 64)  # 2 blocks per row, rows % 8 == 0
    q = quantize_fused(jnp.asarray(x), fmt, interpret=True, encode=encode)
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), 127)  # 2^0 in every block
    np.testing.assert_array_equal(np.asarray(q.data).view(np.uint8), x.astype(elem).view(np.uint8))


@pytest.mark.parametrize("encode", ["integer", "threshold", "magic"])
def test_mxfp4_every_midpoint_rounds_to_even(encode):
    """E2M1 by both encoders: every midpoint of the grid, one float32 ulp either side, the grid and
    their negatives (-0 included), in blocks whose amax 6 gives the scale 2^0: ml_dtypes' RNE codes."""
    import ml_dtypes

    e2m1 = ml_dtypes.float4_e2m1fn
    mags = np.unique(np.abs(np.arange(16, dtype=np.uint8).view(e2m1).astype(np.float32)))  # 0 .. 6
    mid = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    vals = np.concatenate([mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(9)), mags])
    vals = np.concatenate([vals, -vals]).astype(np.float32)
    blocks = np.resize(vals, (8, 31))
    x = np.concatenate([np.full((8, 1), 6.0, np.float32), blocks], axis=1).reshape(4, 64)
    x = np.concatenate([x, x], axis=0)  # 8 rows
    q = quantize_fused(jnp.asarray(x), "mxfp4", interpret=True, encode=encode, fp4_layout="codes")
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), 127)
    want = x.astype(e2m1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.data.astype(jnp.float32)), want)
    got_sign = np.signbit(np.asarray(q.data.astype(jnp.float32)))
    np.testing.assert_array_equal(got_sign, np.signbit(want))  # -0 stays -0


@pytest.mark.parametrize("elem", ["float8_e4m3fn", "float8_e5m2", "float6_e3m2fn", "float6_e2m3fn",
                                  "float4_e2m1fn"])
def test_magic_add_encoder_is_ml_dtypes_rne_on_every_binade(elem):
    """_encode_magic (one float add) against ml_dtypes' cast, outside Pallas: every grid point and
    midpoint +-1 and +-2 float32 ulps, f32 subnormals and zeros, and 2^16 random values in +-max."""
    import ml_dtypes

    from lowbit.kernels.quantize_pallas import _encode_magic
    from tests.reference_np import elem_max

    dtype = getattr(ml_dtypes, elem)
    info, bits = ml_dtypes.finfo(dtype), ml_dtypes.finfo(dtype).bits
    grid = np.unique(np.abs(np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)))
    grid = grid[np.isfinite(grid)]
    mid = (grid[:-1] + grid[1:]) / 2
    vals = np.concatenate([grid, mid]).astype(np.float32)
    for step in (1, 2):
        up, down = vals.view(np.int32) + step, vals.view(np.int32) - step
        vals = np.concatenate([vals, up.view(np.float32), down[down > 0].view(np.float32)])
    tiny = np.array([0.0, 1e-45, 1e-40, 2.0**-126], np.float32)
    rng = np.random.default_rng(9)
    rand = rng.uniform(-1, 1, 2**16) * np.exp2(rng.integers(-12, 1, 2**16))
    vals = np.concatenate([vals, tiny, (rand * elem_max(dtype)).astype(np.float32)])
    vals = vals[np.abs(vals) <= elem_max(dtype)]
    vals = np.concatenate([vals, -vals]).astype(np.float32)

    got = np.asarray(_encode_magic(jnp.asarray(vals), int(info.minexp), int(info.nmant), bits))
    want = vals.astype(dtype).view(np.uint8).astype(np.int64)  # sub-byte codes sit in the low bits
    np.testing.assert_array_equal(got.astype(np.int64), want)


def test_encode_convert_is_for_fp8_nearest_only():
    x = jnp.zeros((32, 64), jnp.float32)
    with pytest.raises(ValueError, match="encode='convert' is for round-to-nearest 8-bit"):
        quantize_fused(x, "mxfp4", encode="convert", interpret=True)
    with pytest.raises(ValueError, match="encode='convert'"):
        quantize_fused(x, "mxfp8", encode="convert", rounding="stochastic", key=jax.random.key(0),
                       interpret=True)
    with pytest.raises(ValueError, match="encode='threshold' is for round-to-nearest E2M1"):
        quantize_fused(x, "mxfp8", encode="threshold", interpret=True)
    with pytest.raises(ValueError, match="unknown encode"):
        quantize_fused(x, "mxfp8", encode="fast", interpret=True)


# (format, fused kwargs = lowbit.quantize kwargs, input dtype) for the block-values output
VALUES_CASES = [
    ("mxfp8", {}, np.float32),
    ("mxfp8", {"scale_mode": "rceil", "prescale": 0.75}, jnp.bfloat16),
    ("mxfp8_e5m2", {}, jnp.bfloat16),
    ("mxfp4", {}, np.float32),
    ("mxfp4", {"scale_mode": "rceil"}, jnp.bfloat16),
    ("nvfp4", {}, np.float32),
    ("nvfp4", {"axis": (0, 1)}, jnp.bfloat16),
]


@pytest.mark.parametrize(("name", "kw", "dtype"), VALUES_CASES, ids=_case_id)
@pytest.mark.parametrize("values_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_block_values_are_the_emulated_gemms_operand(name, kw, dtype, values_dtype):
    """values_dtype: the kernel writes data · block scale, bit for bit what the emulate backend computes from
    lowbit.quantize's QArray (split_scales: zeros, signed zeros, subnormal elements, NaN blocks included),
    with the same tensor scale and prescale left for the accumulator."""
    from lowbit.backends.emulate import split_scales

    with np.errstate(over="ignore"):
        x = jnp.asarray(_edge_input(np.float32).astype(dtype))
    got = quantize_fused(x, name, interpret=True, values_dtype=values_dtype, **kw)
    q = lowbit.quantize(x, name, **kw)
    want, want_outer = split_scales(q, values_dtype)
    assert isinstance(got, BlockValues)
    assert got.values.dtype == want.dtype and got.values.shape == x.shape
    assert got.axis == q.axis and got.prescale == q.prescale and got.fmt == q.fmt
    assert np.isnan(np.asarray(want, np.float32)).any()  # the NaN/Inf rows poisoned some blocks
    np.testing.assert_array_equal(_bits(got.values), _bits(want))
    _, got_outer = split_scales(got, values_dtype)
    np.testing.assert_array_equal(np.float32(got_outer), np.float32(want_outer))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8"])
def test_block_values_with_stochastic_rounding(name):
    """SR's hashed u is the same whether the kernel writes codes or values."""
    from lowbit.backends.emulate import split_scales

    x = jnp.asarray(np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32))
    key = jax.random.key(5)
    got = quantize_fused(x, name, rounding="stochastic", key=key, interpret=True, values_dtype=jnp.bfloat16)
    want, _ = split_scales(lowbit.quantize(x, name, rounding="stochastic", key=key), jnp.bfloat16)
    np.testing.assert_array_equal(_bits(got.values), _bits(want))
    rne, _ = split_scales(lowbit.quantize(x, name), jnp.bfloat16)
    assert np.mean(_bits(got.values) != _bits(rne)) > 0.05  # SR really rounded differently from RNE
