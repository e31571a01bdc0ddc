"""lowbit.quantize held bit for bit to the plain-NumPy reference (tests/reference_np.py).

Data are compared as element bit codes (signed zeros included), MX scales as E8M0 bytes, NVFP4
scales as E4M3 codes, tensor scales as float32 bits. The reference derives every grid from
ml_dtypes and rounds by search, so it shares only the spec (docs/numerics.md) with lowbit.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
from tests.reference_np import (
    REF_FORMATS,
    elem_grid,
    elem_max,
    ref_dequantize,
    ref_encode,
    ref_grid_neighbours,
    ref_quantize,
    ref_round_to_grid,
    signed_grid,
)

MX_NAMES = [n for n, (kind, _, _) in REF_FORMATS.items() if kind == "mx"]
ALL_NAMES = list(REF_FORMATS)
# (format name, scale_mode): scale_mode matters for MX formats only.
FORMAT_MODES = [(n, m) for n in MX_NAMES for m in ("floor", "rceil")] + [
    ("nvfp4", "floor"), ("fp8", "floor"), ("fp8_e5m2", "floor")]
FM_IDS = [f"{n}-{m}" if n in MX_NAMES else n for n, m in FORMAT_MODES]
F32_TINY = np.float32(2.0**-126)


def fmt_of(name: str) -> lowbit.Format:
    return lowbit.get_format(name)


def block_of(name: str) -> int:
    return REF_FORMATS[name][2]


@functools.cache
def _jitted_quantize(name, axis, scale_mode, rounding, pad, prescale):
    fmt = fmt_of(name)
    return jax.jit(lambda x, key: lowbit.quantize(x, fmt, axis=axis, rounding=rounding, key=key,
                                                  scale_mode=scale_mode, pad=pad, prescale=prescale))


def quantize(x, name, axis=-1, scale_mode="floor", rounding="nearest", key=None, pad=False, prescale=1.0):
    """lowbit.quantize under one jax.jit per configuration: compiles ~5x faster than eager op-by-op
    (test_jit_and_vmap_equal_eager holds the eager path to the same bits)."""
    return _jitted_quantize(name, axis, scale_mode, rounding, pad, prescale)(jnp.asarray(x), key)


@functools.cache
def _jitted_dequantize(dtype):
    return jax.jit(lambda q: lowbit.dequantize(q, dtype))


def dequantize(q, dtype=jnp.float32):
    return _jitted_dequantize(jnp.dtype(dtype))(q)


@functools.cache
def _jitted_qdq(name, axis, scale_mode):
    fmt = fmt_of(name)
    return jax.jit(lambda x: lowbit.qdq(x, fmt, axis=axis, scale_mode=scale_mode))


def qdq(x, name, axis=-1, scale_mode="floor"):
    return _jitted_qdq(name, axis, scale_mode)(jnp.asarray(x))


def storage_dtype(fmt) -> np.dtype:
    """dtype of q.data: the element dtype, except that JAX has no float6 arrays, so FP6 values
    may be held in an 8-bit float that holds each of them exactly (`Format.storage_dtype`)."""
    storage = np.dtype(getattr(fmt, "storage_dtype", None) or fmt.elem_dtype)
    if storage != np.dtype(fmt.elem_dtype):
        assert np.dtype(fmt.elem_dtype).name.startswith("float6") and storage.itemsize == 1, storage
        grid = signed_grid(fmt.elem_dtype)
        assert np.array_equal(grid.astype(storage).astype(np.float64), grid), (fmt, storage)
    return storage


# ----------------------------------------------------------------------------- comparison helpers


def _first_mismatches(mask, x, want, got, limit=5) -> str:
    idx = np.argwhere(mask)[:limit]
    rows = [f"  at {tuple(int(i) for i in ix)}: x={x[tuple(ix)]!r} want={want[tuple(ix)]!r} "
            f"got={got[tuple(ix)]!r}" for ix in idx]
    return f"{int(mask.sum())} mismatches\n" + "\n".join(rows)


def _element_nan_block_mask(rq, axis, shape) -> np.ndarray:
    """Elements whose block (or tensor) scale is NaN: the spec stores 0 there, sign unspecified."""
    if rq.kind == "tensor":
        return np.full(shape, bool(np.isnan(rq.tensor_scale)))
    mask = np.isnan(rq.scale_values)
    axes = (axis,) if isinstance(axis, int) else axis
    for a in axes:
        mask = np.repeat(mask, 32 if rq.kind == "mx" else 16, axis=a % len(shape))
    return mask[tuple(slice(0, n) for n in shape)]


def assert_matches_reference(q, rq, x, axis=-1):
    """Bit equality of data, scale and tensor_scale between a QArray and a reference RefQ."""
    x64 = np.asarray(x).astype(np.float64)
    got_data = np.asarray(q.data)
    storage = storage_dtype(q.fmt)
    assert got_data.dtype == storage, (got_data.dtype, storage)
    assert got_data.shape == x64.shape
    got_bits, want_bits = got_data.view(np.uint8), ref_encode(rq.data, storage)
    nan_block = _element_nan_block_mask(rq, axis, x64.shape)
    bad = (got_bits != want_bits) & ~nan_block
    bad |= nan_block & (got_data.astype(np.float64) != 0)
    assert not bad.any(), "data: " + _first_mismatches(
        bad, x64, rq.data, got_data.astype(np.float64))
    if rq.kind == "tensor":
        assert q.scale is None
    else:
        got_scale = np.asarray(q.scale)
        assert got_scale.shape == rq.scale_bits.shape, (got_scale.shape, rq.scale_bits.shape)
        got_sbits = got_scale.view(np.uint8)
        if rq.kind == "mx":
            assert got_scale.dtype == np.dtype(ml_dtypes.float8_e8m0fnu)
            bad_s = got_sbits != rq.scale_bits
        else:
            assert got_scale.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
            want_nan = np.isnan(rq.scale_values)
            bad_s = (np.isnan(got_scale.astype(np.float64)) != want_nan)
            bad_s |= ~want_nan & (got_sbits != rq.scale_bits)
        assert not bad_s.any(), "scale bits: " + _first_mismatches(
            bad_s, np.zeros(bad_s.shape), rq.scale_bits, got_sbits)
    if rq.tensor_scale is None:
        assert q.tensor_scale is None
    else:
        got_ts = np.asarray(q.tensor_scale)
        assert got_ts.dtype == np.float32 and got_ts.shape == ()
        want_ts = np.float32(rq.tensor_scale)
        if np.isnan(want_ts):
            assert np.isnan(got_ts)
        else:
            assert got_ts.view(np.uint32) == want_ts.view(np.uint32), (float(got_ts), float(want_ts))


def bits(a) -> np.ndarray:
    """Bit pattern of any array (1-, 2- or 4-byte elements) as unsigned integers."""
    a = np.ascontiguousarray(np.asarray(a)).reshape(-1)
    return a.view(f"u{a.dtype.itemsize}")


def _flush_f32(v) -> np.ndarray:
    v = np.asarray(v).astype(np.float32)
    return np.where(np.abs(v) < F32_TINY, np.copysign(np.float32(0), v), v)


def assert_dequant_matches(got, want):
    """Bitwise after flushing float32-subnormal results on both sides: the spec leaves a
    subnormal *output* unspecified (XLA's CPU backend flushes it, NumPy keeps it)."""
    got_np, want_np = np.asarray(got), np.asarray(want)
    assert got_np.dtype == want_np.dtype and got_np.shape == want_np.shape
    g, w = _flush_f32(got_np), _flush_f32(want_np)
    same_nan = np.isnan(g) == np.isnan(w)
    bad = ~same_nan | (~np.isnan(w) & (g.view(np.uint32) != w.view(np.uint32)))
    assert not bad.any(), "dequantized: " + _first_mismatches(bad, np.zeros(bad.shape), w, g)


def quantize_both(x_np, name, scale_mode="floor", axis=-1, **kw):
    q = quantize(x_np, name, axis=axis, scale_mode=scale_mode, **kw)
    rq = ref_quantize(x_np, name, axis=axis, scale_mode=scale_mode, **kw)
    return q, rq


def check(x_np, name, scale_mode="floor", axis=-1, **kw):
    q, rq = quantize_both(x_np, name, scale_mode, axis, **kw)
    assert_matches_reference(q, rq, x_np, axis)
    return q, rq


# ----------------------------------------------------------------------------- exhaustive grids


def grid_probe_values(elem) -> np.ndarray:
    """Every finite grid value, every midpoint, and the f32 neighbours of each midpoint, both signs."""
    values, _ = elem_grid(elem)
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    below = np.nextafter(mids, np.float32(-np.inf))
    above = np.nextafter(mids, np.float32(np.inf))
    pos = np.concatenate([values.astype(np.float32), mids, below, above])
    return np.concatenate([pos, -pos]).astype(np.float32)


def pinned_blocks(values: np.ndarray, block: int, pin: float) -> np.ndarray:
    """Rows of `block` elements: element 0 = pin (fixes the block scale), the rest = values."""
    per_row = block - 1
    n_rows = -(-len(values) // per_row)
    body = np.zeros(n_rows * per_row, np.float32)
    body[: len(values)] = values
    return np.concatenate([np.full((n_rows, 1), pin, np.float32), body.reshape(n_rows, per_row)], 1)


def assert_grid_expectations(got_values, probes, elem):
    """Independent of the reference: on-grid values are exact; off-midpoint values go to the
    nearer neighbour; exact midpoints go to the neighbour with the even code."""
    lo, hi = ref_grid_neighbours(probes.astype(np.float64), elem)
    p = probes.astype(np.float64)
    nearer = np.where(np.abs(p - lo) < np.abs(hi - p), lo, hi)
    is_mid = np.abs(p - lo) == np.abs(hi - p)
    lo_even = ref_encode(lo, elem) % 2 == 0
    mid_pick = np.where(lo_even, lo, hi)
    expected = np.where(lo == hi, lo, np.where(is_mid, mid_pick, nearer))
    np.testing.assert_array_equal(got_values, expected)


@pytest.mark.parametrize("name,scale_mode", [fm for fm in FORMAT_MODES if fm[0] in MX_NAMES],
                         ids=[i for i, fm in zip(FM_IDS, FORMAT_MODES, strict=True) if fm[0] in MX_NAMES])
def test_exhaustive_grid_mx(name, scale_mode):
    elem = REF_FORMATS[name][1]
    probes = grid_probe_values(elem)
    x = pinned_blocks(probes, 32, elem_max(elem))
    q, rq = check(x, name, scale_mode)
    assert np.all(np.asarray(q.scale).view(np.uint8) == 127), "the element max must pin 2^0"
    got = np.asarray(q.data).astype(np.float64)[:, 1:].reshape(-1)[: len(probes)]
    assert_grid_expectations(got, probes, elem)


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_exhaustive_grid_fp8(name):
    elem = REF_FORMATS[name][1]
    probes = grid_probe_values(elem)
    x = np.concatenate([[np.float32(elem_max(elem))], probes]).astype(np.float32)
    q, _ = check(x, name)
    assert float(q.tensor_scale) == 1.0
    assert_grid_expectations(np.asarray(q.data).astype(np.float64)[1:], probes, elem)


def test_exhaustive_grid_nvfp4():
    elem = ml_dtypes.float4_e2m1fn
    probes = grid_probe_values(elem)
    blocks = pinned_blocks(probes, 16, 6.0)  # block scale (6/6)/ts = 1 ...
    tensor_pin = np.zeros((1, 16), np.float32)
    tensor_pin[0, 0] = 2688.0  # ... with ts = 2688 / (448 * 6) = 1
    x = np.concatenate([tensor_pin, blocks])
    q, _ = check(x, "nvfp4")
    assert float(q.tensor_scale) == 1.0
    assert np.all(np.asarray(q.scale).astype(np.float64)[1:] == 1.0)
    got = np.asarray(q.data).astype(np.float64)[1:, 1:].reshape(-1)[: len(probes)]
    assert_grid_expectations(got, probes, elem)


E2M1_TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
             (6.1, 6.0)]


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_e2m1_ties_from_design(name):
    """DESIGN.md: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4, 6.1->6 (scale 1)."""
    xs = np.array([t for t, _ in E2M1_TIES], np.float32)
    want = np.array([w for _, w in E2M1_TIES])
    block = block_of(name)
    row = np.zeros(block, np.float32)
    row[: len(xs)], row[len(xs): 2 * len(xs)] = xs, -xs
    if name == "mxfp4":
        x = row[None]  # amax 6.1: floor exponent 2 - emax 2 = 0, so y = x
    else:
        row[0] = 6.0  # block amax 6 -> scale 1 with ts = 1 (2688 in the other block)
        row[len(xs)], x_pin = -6.0, np.zeros(block, np.float32)
        x_pin[0] = 2688.0
        x = np.stack([row, x_pin])
    q = quantize(x, name)
    got = np.asarray(q.data).astype(np.float64)[0]
    if name == "mxfp4":
        np.testing.assert_array_equal(got[: len(xs)], want)
        np.testing.assert_array_equal(got[len(xs): 2 * len(xs)], -want)
    else:
        np.testing.assert_array_equal(got[1: len(xs)], want[1:])  # 0.25 is replaced by the pin
        np.testing.assert_array_equal(got[len(xs) + 1: 2 * len(xs)], -want[1:])


# ----------------------------------------------------------------------------- random data


CASES = [((256,), -1), ((64, 24), 0), ((3, 64, 5), 1), ((2, 3, 2, 64), -1)]


def random_mixed(rng, shape) -> np.ndarray:
    """Per element one of: normal, Student-t (df 2), log-uniform magnitude 2^-40..2^40; per leading
    index a random power-of-two factor, so blocks span many scales."""
    normal = rng.standard_normal(shape)
    heavy = rng.standard_t(2.0, shape)
    logmag = rng.choice([-1.0, 1.0], shape) * np.exp2(rng.uniform(-40, 40, shape))
    pick = rng.integers(0, 3, shape)
    x = np.choose(pick, [normal, heavy, logmag])
    x = x * np.exp2(rng.integers(-30, 30, (shape[0],) + (1,) * (len(shape) - 1)))
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,scale_mode", FORMAT_MODES, ids=FM_IDS)
def test_random_bit_exact(name, scale_mode, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{scale_mode}-{np.dtype(dtype).name}".encode()))
    for case, (shape, axis) in enumerate(CASES):
        for x in (rng.standard_normal(shape).astype(np.float32), random_mixed(rng, shape)):
            x = x.astype(dtype)
            q, rq = check(x, name, scale_mode, axis)
            if rq.kind != "tensor":
                assert q.axis == (axis % len(shape),)
            want = ref_dequantize(rq, axis, np.float32)
            assert_dequant_matches(dequantize(q, jnp.float32), want)
            if case == 2:  # qdq = dequantize(quantize(x), x.dtype), on the middle-axis case
                out = qdq(x, name, axis=axis, scale_mode=scale_mode)
                assert out.dtype == jnp.dtype(dtype)
                assert_dequant_matches(out, ref_dequantize(rq, axis, dtype))


def test_float16_input_matches_reference():
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float16)
    check(x, "mxfp8", "rceil")
    check(x, "nvfp4")


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name,scale_mode", FORMAT_MODES, ids=FM_IDS)
def test_zero_blocks_signed_zeros_and_subnormal_inputs(name, scale_mode):
    block = max(block_of(name), 16)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, block)).astype(np.float32)
    x[0] = 0.0  # all-zero block
    x[1] = np.where(np.arange(block) % 2, -0.0, 0.0)  # signed zeros only
    x[2] = np.float32(1e-40) * np.where(np.arange(block) % 2, -1, 1)  # f32 subnormals only
    x[3, :4] = [-0.0, 0.0, -1e-40, 1e-40]  # signed zeros among normal values
    x[3, 4:8] = [-1e-3, 1e-3, -1e-30, 1e-30]  # small values that round to signed zero
    q, rq = check(x, name, scale_mode)
    data = np.asarray(q.data)
    assert np.all(data[:3].astype(np.float64) == 0)
    np.testing.assert_array_equal(np.signbit(data[1:3].astype(np.float32)), np.signbit(x[1:3]))
    np.testing.assert_array_equal(np.signbit(data[3, :4].astype(np.float32)), [1, 0, 1, 0])
    if rq.kind == "mx":
        assert np.all(np.asarray(q.scale).view(np.uint8)[:3] == 0), "E8M0 lower clamp 2^-127"


def test_subnormal_only_tensors_flush_to_zero():
    """Flush before the amax: an all-subnormal tensor is an all-zero tensor (documented choice)."""
    x = np.float32(1e-40) * np.where(np.arange(32) % 2, -1, 1).astype(np.float32)
    q, _ = check(x, "fp8")
    assert float(q.tensor_scale) == 1.0 and np.all(np.asarray(q.data).astype(np.float32) == 0)
    q, _ = check(x, "nvfp4")
    assert float(q.tensor_scale) == 2.0**-120  # the tensor-scale floor
    assert np.all(np.asarray(q.data).astype(np.float32) == 0)
    np.testing.assert_array_equal(np.signbit(np.asarray(q.data).astype(np.float32)), np.signbit(x))
    assert np.all(np.asarray(q.scale).astype(np.float32) == 2.0**-6)
    assert_dequant_matches(dequantize(q), np.copysign(np.zeros(32, np.float32), x))


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_scale_at_powers_of_two(name):
    """amax = 2^k: floor byte = k - emax + 127; amax = max * 2^k: rceil byte = k + 127 (no round-up);
    one f32 ulp above either: floor unchanged, rceil rounds up by one."""
    fmt = fmt_of(name)
    ks = np.array([-100, -20, -1, 0, 1, 7, 20, 100])
    pow2 = np.exp2(ks).astype(np.float32)
    max_pow2 = (fmt.elem_max * np.exp2(ks)).astype(np.float32)
    amaxes = np.concatenate([pow2, np.nextafter(pow2, np.float32(np.inf)),
                             max_pow2, np.nextafter(max_pow2, np.float32(np.inf))])
    x = np.random.default_rng(0).uniform(-1, 1, (len(amaxes), 32)).astype(np.float32)
    x = x * amaxes[:, None] * np.float32(0.5)
    x[:, 5] = -amaxes  # the amax, negative to check |.| is used
    n = len(ks)
    qf, _ = check(x, name, "floor")
    qr, _ = check(x, name, "rceil")
    floor_bytes = np.asarray(qf.scale).view(np.uint8)[:, 0].astype(int)
    rceil_bytes = np.asarray(qr.scale).view(np.uint8)[:, 0].astype(int)
    np.testing.assert_array_equal(floor_bytes[:n], ks - fmt.emax + 127)
    np.testing.assert_array_equal(floor_bytes[n: 2 * n], ks - fmt.emax + 127)
    np.testing.assert_array_equal(rceil_bytes[2 * n: 3 * n], ks + 127)
    np.testing.assert_array_equal(rceil_bytes[3 * n:], ks + 128)


@pytest.mark.parametrize("name,scale_mode", [fm for fm in FORMAT_MODES if fm[0] in MX_NAMES] + [
    ("nvfp4", "floor"), ("fp8", "floor")], ids=FM_IDS[:-1])
def test_huge_and_tiny_magnitudes(name, scale_mode):
    """Near float32 max, near the smallest normal (rceil's subnormal d = amax / max branch), 2^-120."""
    rng = np.random.default_rng(5)
    f32max = np.finfo(np.float32).max
    tiny_amaxes = np.float32(2.0**-126) * np.array([1, 1.5, 2, 3, 3.01, 4, 5, 5.99, 6, 7, 448, 500])
    amaxes = np.concatenate([[f32max, f32max / 2, 2.0**127, 2.0**-120, 2.0**-125], tiny_amaxes])
    x = (rng.uniform(-1, 1, (len(amaxes), 32)) * amaxes[:, None]).astype(np.float32)
    x[:, 0] = amaxes.astype(np.float32)
    for rows in (slice(0, 3), slice(3, None)):  # per-tensor scales: huge and tiny apart
        q, rq = check(x[rows], name, scale_mode)
        if rq.kind != "tensor":
            assert np.all(~np.isnan(np.asarray(q.scale).astype(np.float32)))


@pytest.mark.parametrize("name", MX_NAMES)
def test_e8m0_clamps(name):
    """floor: amax 2^-126 needs 2^(-126-emax) < 2^-127: clamped to byte 0, elements stay exact
    powers of two. The top clamp (254) is unreachable from float32 input: the largest f32 gives
    byte 254 - emax (floor)."""
    fmt = fmt_of(name)
    x = np.zeros((2, 32), np.float32)
    x[0, :3] = [2.0**-126, -(2.0**-126), 2.0**-125]
    x[1, 0] = np.finfo(np.float32).max
    q, _ = check(x, name, "floor")
    scale_bytes = np.asarray(q.scale).view(np.uint8)[:, 0]
    assert scale_bytes[0] == 0
    assert scale_bytes[1] == 127 + 127 - fmt.emax
    y = np.clip(np.array([2.0, -2.0, 4.0]), -fmt.elem_max, fmt.elem_max)  # 2^-126 * 2^127 = 2
    np.testing.assert_array_equal(np.asarray(q.data)[0, :3].astype(np.float64), y)
    check(x, name, "rceil")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name,scale_mode", [("mxfp8", "floor"), ("mxfp8", "rceil"),
                                             ("mxfp4", "floor"), ("mxfp6_e3m2", "rceil"),
                                             ("nvfp4", "floor")])
def test_non_finite_poisons_only_its_block(name, scale_mode, bad):
    block = block_of(name)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4 * block)).astype(np.float32)
    x[1, block + 3] = bad
    q, rq = check(x, name, scale_mode)
    clean = x.copy()
    clean[1, block + 3] = 0.0
    q_clean = quantize(clean, name, scale_mode=scale_mode)
    scale = np.asarray(q.scale)
    nan_scale = np.isnan(scale.astype(np.float32))
    expected_nan = np.zeros(scale.shape, bool)
    expected_nan[1, 1] = True
    np.testing.assert_array_equal(nan_scale, expected_nan)
    if name != "nvfp4":
        assert scale.view(np.uint8)[1, 1] == 255
    ok = ~expected_nan
    np.testing.assert_array_equal(scale.view(np.uint8)[ok], np.asarray(q_clean.scale).view(np.uint8)[ok])
    data, data_clean = np.asarray(q.data).view(np.uint8), np.asarray(q_clean.data).view(np.uint8)
    in_bad_block = np.zeros(x.shape, bool)
    in_bad_block[1, block: 2 * block] = True
    np.testing.assert_array_equal(data[~in_bad_block], data_clean[~in_bad_block])
    assert np.all(np.asarray(q.data)[in_bad_block].astype(np.float32) == 0)
    if q.tensor_scale is not None:  # NVFP4: the tensor amax ignores non-finite values
        assert np.asarray(q.tensor_scale).view(np.uint32) == np.asarray(q_clean.tensor_scale).view(np.uint32)
    deq = np.asarray(dequantize(q))
    assert np.all(np.isnan(deq[in_bad_block])) and np.all(np.isfinite(deq[~in_bad_block]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fp8_non_finite_tensor(bad):
    x = np.linspace(-3, 3, 64).astype(np.float32)
    x[10] = bad
    q, _ = check(x, "fp8")
    assert np.isnan(np.asarray(q.tensor_scale))
    assert np.all(np.isnan(np.asarray(dequantize(q))))


def test_nvfp4_tensor_scale_from_finite_values_only():
    x = np.random.default_rng(9).standard_normal((2, 32)).astype(np.float32)
    amax = np.float32(np.abs(x).max())
    x[0, 0], x[1, 31] = np.inf, np.nan
    q, _ = check(x, "nvfp4")
    assert np.asarray(q.tensor_scale).view(np.uint32) == np.float32(amax / np.float32(2688)).view(np.uint32)


def test_nvfp4_tensor_scale_floor_keeps_divisor_normal():
    """ts = max(f32(amax / 2688), 2^-120): 2^-120 * 2^-6 = 2^-126, the smallest normal float32."""
    x = np.zeros((3, 16), np.float32)
    x[0, 0] = 2688.0 * 2.0**-123  # amax / 2688 = 2^-123 < floor
    x[1, :3] = [2.0**-125, -(2.0**-124), 3.0 * 2.0**-126]
    x[2, :2] = [2.0**-120, 2.0**-121]
    q, rq = check(x, "nvfp4")
    assert float(q.tensor_scale) == 2.0**-120
    assert np.all(np.isfinite(np.asarray(dequantize(q))))
    assert_dequant_matches(dequantize(q), ref_dequantize(rq))


def test_nvfp4_multiplies_by_the_per_block_reciprocal():
    """NVFP4 elements are y = f32(x * f32(f32(1/ts) / s)) (torchao's form quoted in DESIGN.md),
    not x / f32(ts * s): here the product form gives exactly 3.5 (ties to 4) and ours 3.4999998 (-> 3)."""
    x = np.zeros((2, 16), np.float32)
    x[0, 0] = np.float32(54.818874)  # ts = f32(54.818874 / 2688)
    x[1, :2] = [np.float32(51.615543), np.float32(29.693556)]  # block scale 416
    ts = np.float32(x[0, 0] / np.float32(2688))
    assert np.float32(x[1, 1] / np.float32(ts * np.float32(416))) == 3.5
    recip = np.float32(np.float32(np.float32(1.0) / ts) / np.float32(416))
    assert np.float32(x[1, 1] * recip) == np.float32(3.4999998)
    q, _ = check(x, "nvfp4")
    assert float(np.asarray(q.data)[1, 1].astype(np.float32)) == 3.0


def test_nvfp4_block_scale_lower_clamp():
    """Block scales below E4M3's smallest normal are clamped up to 2^-6 (torchao), never 0."""
    x = np.zeros((2, 16), np.float32)
    x[0, 0] = 2688.0 * 1000  # ts = 1000
    x[1, :4] = [1e-3, -2e-3, 5e-4, 0]  # (2e-3 / 6) / 1000 << 2^-6
    q, _ = check(x, "nvfp4")
    assert float(np.asarray(q.scale)[1, 0].astype(np.float32)) == 2.0**-6


@pytest.mark.parametrize("shape", [(32, 48), (2, 16, 64)])
def test_nvfp4_2d_tiles(shape):
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    x[..., :16, :16] *= 50  # one loud tile
    q, rq = check(x, "nvfp4", axis=(-2, -1))
    assert q.scale.shape == shape[:-2] + (shape[-2] // 16, shape[-1] // 16)
    assert q.axis == (len(shape) - 2, len(shape) - 1)
    assert_dequant_matches(dequantize(q), ref_dequantize(rq, (-2, -1)))


def test_nvfp4_2d_scales_of_transpose_are_transposed():
    """16x16 tiles: W and W^T share one set of scales (fprop and dgrad reuse them)."""
    w = np.random.default_rng(12).standard_t(3.0, (48, 80)).astype(np.float32)
    q = quantize(w, "nvfp4", axis=(-2, -1))
    qt = quantize(w.T, "nvfp4", axis=(-2, -1))
    np.testing.assert_array_equal(np.asarray(qt.scale).view(np.uint8), np.asarray(q.scale).view(np.uint8).T)
    np.testing.assert_array_equal(np.asarray(qt.data).view(np.uint8), np.asarray(q.data).view(np.uint8).T)


def test_mx_2d_tiles():
    x = np.random.default_rng(13).standard_normal((64, 96)).astype(np.float32)
    x[32:, :32] *= 1e4
    check(x, "mxfp8", "rceil", axis=(0, 1))


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name,scale_mode", [("mxfp8", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")])
@pytest.mark.parametrize("shape,axis", [((3, 40), -1), ((40, 3), 0), ((2, 21, 3), 1)])
def test_pad_matches_zero_padded_reference(name, scale_mode, shape, axis):
    x = np.random.default_rng(17).standard_normal(shape).astype(np.float32)
    q, rq = check(x, name, scale_mode, axis, pad=True)
    block = block_of(name)
    n = shape[axis]
    assert q.scale.shape[axis % len(shape)] == -(-n // block)
    assert_dequant_matches(dequantize(q), ref_dequantize(rq, axis))


@pytest.mark.parametrize("name", ["mxfp8", "nvfp4"])
def test_pad_false_names_sizes_and_fix(name):
    x = jnp.ones((3, 40), jnp.float32)
    with pytest.raises(ValueError) as err:
        lowbit.quantize(x, fmt_of(name))
    message = str(err.value)
    assert "40" in message and str(block_of(name)) in message and "pad=True" in message


# ----------------------------------------------------------------------------- dequantize / qdq


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float32, (2, 64), elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)),
    name=st.sampled_from(MX_NAMES),
    scale_mode=st.sampled_from(["floor", "rceil"]),
)
def test_qdq_idempotent(x, name, scale_mode):
    once = qdq(x, name, scale_mode=scale_mode)
    twice = qdq(once, name, scale_mode=scale_mode)
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(once))


def _grid_half_ulp(y, fmt) -> np.ndarray:
    """Half the element-grid spacing at |y|: 2^(max(floor(log2 |y|), emin) - mbits - 1)."""
    exp = np.floor(np.log2(np.maximum(np.abs(y), 2.0**-200)))
    return np.exp2(np.maximum(exp, fmt.emin) - fmt.mbits - 1)


@pytest.mark.parametrize("name,scale_mode", FORMAT_MODES, ids=FM_IDS)
def test_error_within_half_ulp_times_scale(name, scale_mode):
    fmt = fmt_of(name)
    x = np.random.default_rng(19).standard_t(4.0, (8, 64)).astype(np.float32)
    q = quantize(x, name, scale_mode=scale_mode)
    deq = np.asarray(dequantize(q)).astype(np.float64)
    if fmt.kind == "mx":
        elem_scale = np.repeat(np.exp2(np.asarray(q.scale).view(np.uint8).astype(np.float64) - 127), 32, -1)
        slack = 0.0
    elif fmt.kind == "nvfp4":
        block_scale = np.float32(q.tensor_scale) * np.asarray(q.scale).astype(np.float32)  # f32, as the spec
        elem_scale = np.repeat(block_scale.astype(np.float64), 16, -1)
        slack = 2.0**-22  # y = f32(x / f32(ts * s)) and the dequantized product round in f32
    else:
        elem_scale, slack = float(q.tensor_scale), 2.0**-22
    y = x / elem_scale
    inside = np.abs(y) <= fmt.elem_max
    bound = _grid_half_ulp(y, fmt) * elem_scale + slack * np.abs(x)
    err = np.abs(x - deq)
    assert inside.mean() > 0.9
    assert np.all(err[inside] <= bound[inside]), float((err - bound)[inside].max())
    # clipped elements (MX floor, NVFP4 scales rounded down) end at +-max * scale (f32 product)
    clipped_to = fmt.elem_max * elem_scale * np.ones_like(y)
    np.testing.assert_allclose(np.abs(deq[~inside]), clipped_to[~inside], rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("name,scale_mode", [fm for fm in FORMAT_MODES if fm[0] in MX_NAMES],
                         ids=[i for i, fm in zip(FM_IDS, FORMAT_MODES, strict=True) if fm[0] in MX_NAMES])
def test_mx_scale_byte_steps_by_one_when_doubled(name, scale_mode):
    x = np.random.default_rng(23).standard_normal((8, 64)).astype(np.float32)
    q1 = quantize(x, name, scale_mode=scale_mode)
    q2 = quantize(2 * x, name, scale_mode=scale_mode)
    b1, b2 = np.asarray(q1.scale).view(np.uint8), np.asarray(q2.scale).view(np.uint8)
    assert np.all((b1 > 0) & (b1 < 253))
    np.testing.assert_array_equal(b2.astype(int), b1.astype(int) + 1)
    np.testing.assert_array_equal(np.asarray(q2.data).view(np.uint8), np.asarray(q1.data).view(np.uint8))


def test_dequantize_function_and_method_agree_and_cast():
    x = jnp.asarray(np.random.default_rng(29).standard_normal((4, 64)).astype(np.float32))
    q = quantize(x, "mxfp8")
    a, b = lowbit.dequantize(q, jnp.bfloat16), q.dequantize(jnp.bfloat16)
    assert a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    assert lowbit.dequantize(q).dtype == jnp.float32


# ----------------------------------------------------------------------------- stochastic rounding


def test_stochastic_without_key_is_an_error():
    with pytest.raises(ValueError, match="key"):
        lowbit.quantize(jnp.ones((32,)), lowbit.MXFP4, rounding="stochastic")


SR_VALUES = np.array([1.25, 0.3, -2.7, 5.2, 0.75, -0.1], np.float32)  # y = x (scale pinned to 1)


@pytest.fixture(scope="module")
def sr_draws():
    """4096 blocks [6, v, v, ...]: ~20000 independent SR draws of each value of SR_VALUES."""
    n_rows = 4096
    body = np.resize(SR_VALUES, 31 * n_rows).reshape(n_rows, 31)
    x = np.concatenate([np.full((n_rows, 1), 6.0, np.float32), body], 1)
    q = quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(0))
    return x, q


def test_sr_unbiased_two_point(sr_draws):
    x, q = sr_draws
    data = np.asarray(q.data).astype(np.float64)
    assert np.all(np.asarray(q.scale).view(np.uint8) == 127)
    assert np.all(data[:, 0] == 6.0)
    e2m1 = ml_dtypes.float4_e2m1fn
    for v in SR_VALUES:
        draws = data[:, 1:][x[:, 1:] == v]
        lo, hi = ref_grid_neighbours(float(v), e2m1)
        p = (float(v) - lo) / (hi - lo)
        n = draws.size
        assert n >= 19000
        assert np.all((draws == lo) | (draws == hi)), f"{v}: not a grid neighbour"
        sd_frac = np.sqrt(p * (1 - p) / n)
        assert abs(np.mean(draws == hi) - p) <= 5 * sd_frac, (v, np.mean(draws == hi), p)
        assert abs(draws.mean() - v) <= 5 * (hi - lo) * sd_frac, (v, draws.mean())
    halves = data[:, 1:][x[:, 1:] == 1.25]  # the midpoint: half to 1.0, half to 1.5
    assert abs(np.mean(halves == 1.5) - 0.5) <= 5 * np.sqrt(0.25 / halves.size)


def np_lowbias32(h: np.ndarray) -> np.ndarray:
    """C. Wellons' lowbias32 in plain NumPy uint32 arithmetic (wrapping products)."""
    h = np.asarray(h, np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def np_sr_uniform(key, shape=None, index=None) -> np.ndarray:
    """Spec (docs/numerics.md): (s0, s1) = jax.random.bits(key, (2,), uint32); element p of x has
    flat index i = C-order position mod 2^32 and u = (lowbias32(lowbias32(i ^ s0) ^ s1) >> 9) / 2^23."""
    s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    if index is None:
        index = (np.arange(int(np.prod(shape)), dtype=np.uint64) % 2**32).astype(np.uint32)
        index = index.reshape(shape)
    bits = np_lowbias32(np_lowbias32(np.asarray(index, np.uint32) ^ s0) ^ s1)
    return (bits >> np.uint32(9)).astype(np.float64) / 2.0**23


# (name, scale_mode, shape, axis, pad): blocks along the last axis, along leading axes, 2-D tiles and
# a padded partial block, so the hash's index must follow each element through every blocking.
SR_REF_CASES = [
    ("mxfp4", "floor", (4, 64), -1, False),
    ("mxfp8", "rceil", (4, 64), -1, False),
    ("mxfp6_e2m3", "floor", (4, 64), -1, False),
    ("nvfp4", "floor", (4, 64), -1, False),
    ("fp8_e5m2", "floor", (4, 64), -1, False),
    ("mxfp8", "floor", (64, 3, 2), 0, False),
    ("mxfp4", "floor", (2, 64, 3), 1, False),
    ("nvfp4", "floor", (32, 48), (0, 1), False),
    ("nvfp4", "floor", (2, 16, 32), (1, 2), False),
    ("mxfp4", "floor", (3, 40), -1, True),
    ("nvfp4", "floor", (20, 24), 0, True),
]


@pytest.mark.parametrize("name,scale_mode,shape,axis,pad", SR_REF_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}-ax{c[3]}{'-pad' * c[4]}"
                              for c in SR_REF_CASES])
def test_sr_matches_reference_with_the_hashed_uniforms(name, scale_mode, shape, axis, pad):
    """Spec: u(p) from the counter hash of p's flat index in x; round up iff u < fractional distance."""
    x = random_mixed(np.random.default_rng(31), shape)
    x[:1] = np.random.default_rng(32).standard_normal(shape[1:])
    key = jax.random.key(42)
    q = quantize(x, name, axis=axis, scale_mode=scale_mode, rounding="stochastic", key=key, pad=pad)
    u = np_sr_uniform(key, shape)
    rq = ref_quantize(x, name, axis=axis, scale_mode=scale_mode, pad=pad, u=u)
    rne = ref_quantize(x, name, axis=axis, scale_mode=scale_mode, pad=pad)
    got = np.asarray(q.data).astype(np.float64)
    # scales are those of nearest rounding; values one step at most from RNE
    if rq.kind != "tensor":
        np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), rne.scale_bits)
    bad = got != rq.data  # values: the sign of an SR zero is not specified
    assert not bad.any(), "SR data: " + _first_mismatches(bad, x.astype(np.float64), rq.data, got)
    assert np.any(got != rne.data), "SR never left the RNE value"


def test_sr_hash_pieces_match_numpy():
    """lowbit.quantize's hash, seed derivation and bits -> u against the NumPy spec, incl. indices
    near 2^32 (the flat index wraps there) and flat_index of a 3-D shape."""
    from lowbit.quantize import flat_index, mix32, sr_hash, sr_seeds, sr_uniform, uniform_from_bits

    key = jax.random.key(5)
    index = np.array([0, 1, 2, 31, 32, 1023, 2**20 + 7, 2**31, 2**32 - 2, 2**32 - 1], np.uint32)
    seeds = sr_seeds(key)
    np.testing.assert_array_equal(np.asarray(seeds), np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    got = np.asarray(uniform_from_bits(sr_hash(jnp.asarray(index), seeds))).astype(np.float64)
    np.testing.assert_array_equal(got, np_sr_uniform(key, index=index))
    np.testing.assert_array_equal(np.asarray(flat_index((3, 5, 7))),
                                  np.arange(105, dtype=np.uint32).reshape(3, 5, 7))
    np.testing.assert_array_equal(np.asarray(sr_uniform(key, (6, 40))).astype(np.float64),
                                  np_sr_uniform(key, (6, 40)))
    assert np.asarray(np_lowbias32(np.array([0], np.uint32)))[0] == 0  # lowbias32 fixes 0
    np.testing.assert_array_equal(np_lowbias32(np.array([1], np.uint32)),
                                  np.asarray(mix32(jnp.array([1], jnp.uint32))))


@pytest.mark.parametrize("name,low,high", [("mxfp4", 4.0, 6.0), ("mxfp8", 256.0, 448.0)])
def test_sr_decision_depends_only_on_position_and_value(name, low, high):
    """|x| in [low, high] = [2^emax, elem_max] puts every block's amax in the top binade, so every
    block scale is 2^0 and y = x for any blocking. No axis of (40, 36, 33) divides by 32, so each
    blocking pads x differently (pad=True): blocks along axis 0, 1 or 2 and 32x32 tiles on any two
    axes must round every element identically, i.e. its u follows its flat index in x, not its
    position in the padded, blocked array (padding the last axes shifts those positions)."""
    rng = np.random.default_rng(53)
    shape = (40, 36, 33)
    x = (rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)
    key = jax.random.key(9)
    codes = {}
    for axis in (0, 1, 2, (0, 1), (1, 2), (0, 2)):
        q = quantize(x, name, axis=axis, rounding="stochastic", key=key, pad=True)
        assert np.all(bits(q.scale) == 127), axis  # 2^0: y = x
        codes[axis] = bits(q.data)
    for axis, c in codes.items():
        np.testing.assert_array_equal(c, codes[0], err_msg=f"axis {axis} vs 0")
    rne = bits(quantize(x, name, axis=0, pad=True).data)
    assert np.mean(codes[0] != rne) > 0.2  # SR really moved elements off RNE (expected 1/3)


def test_sr_uniform_statistics():
    """u over 2^20 elements at a fixed seed: 64-bin chi-square within [23.2, 131.4], the 1e-6 and
    1 - 1e-6 quantiles of chi2(63) (scipy.stats.chi2.ppf), so a uniform source fails with odds 2e-6;
    the lower bound also rejects a counter that is evenly spread but not random (u = i / n gives 0).
    Other keys (adjacent seeds, fold_in, split) and neighbouring positions are uncorrelated:
    |Pearson r| < 5 / sqrt(n), 5 standard deviations of r under independence."""
    from lowbit.quantize import sr_uniform

    shape, n = (1024, 1024), 2**20
    base = jax.random.key(0)
    u = np.asarray(sr_uniform(base, shape)).astype(np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0

    def chi2(values, bins):
        counts = np.bincount(values, minlength=bins)
        return ((counts - n / bins) ** 2 / (n / bins)).sum()

    assert 23.2 < chi2((u.ravel() * 64).astype(np.int64), 64) < 131.4
    limit = 5 / np.sqrt(n)
    for other in (jax.random.key(1), jax.random.fold_in(base, 1), jax.random.split(base)[0]):
        v = np.asarray(sr_uniform(other, shape)).astype(np.float64)
        assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < limit
        # joint 8 x 8 histogram of (u, v): independence, same chi2(63) bounds
        joint = (u.ravel() * 8).astype(np.int64) * 8 + (v.ravel() * 8).astype(np.int64)
        assert 23.2 < chi2(joint, 64) < 131.4
    for lag in (1, 1024):  # next element of a row; same column, next row
        assert abs(np.corrcoef(u.ravel()[:-lag], u.ravel()[lag:])[0, 1]) < limit


def test_sr_keys():
    x = jnp.asarray(np.random.default_rng(37).standard_normal((8, 64)).astype(np.float32))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    def sr(key):
        q = quantize(x, "mxfp4", rounding="stochastic", key=key)
        return np.asarray(q.data).view(np.uint8)

    np.testing.assert_array_equal(sr(k1), sr(k1))
    assert np.any(sr(k1) != sr(k2))


def test_sr_prescale_three_quarters_never_clips():
    """Tseng et al.: with floor scales y = x * 2^-s in [4, 8); times 3/4 it stays <= 6, so SR of the
    block maximum is unbiased (without prescale 7.9 would clip to 6)."""
    n_rows = 2048
    x = np.full((n_rows, 32), 1.0, np.float32)
    x[:, 0], x[:, 1] = 7.9, -7.9 * 2.0**-3
    x *= np.exp2(np.arange(n_rows) % 7 - 3)[:, None].astype(np.float32)
    q = quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(3), prescale=0.75)
    assert q.prescale == 0.75
    assert np.abs(np.asarray(q.data).astype(np.float32)).max() <= 6
    rel = np.asarray(dequantize(q)).astype(np.float64) / x  # dequantize divides by the prescale
    y = np.float32(7.9 * 0.75)  # 5.925: between 4 and 6
    p = (y - 4.0) / 2.0
    se = 2.0 / 0.75 / 7.9 * np.sqrt(p * (1 - p) / n_rows)
    assert abs(rel[:, 0].mean() - 1.0) <= 5 * se, rel[:, 0].mean()
    assert abs(rel[:, 1].mean() - 1.0) <= 0.05
    rq = ref_quantize(x, "mxfp4", prescale=0.75)
    q_rne = quantize(x, "mxfp4", prescale=0.75)
    assert_matches_reference(q_rne, rq, x)
    assert_dequant_matches(dequantize(q_rne), ref_dequantize(rq))


# ----------------------------------------------------------------------------- jit, vmap, pytree


@pytest.mark.parametrize("name,scale_mode", [("mxfp8", "rceil"), ("mxfp4", "floor"), ("nvfp4", "floor"),
                                             ("fp8", "floor")])
def test_jit_and_vmap_equal_eager(name, scale_mode):
    fmt = fmt_of(name)
    x = jnp.asarray(random_mixed(np.random.default_rng(41), (3, 4, 64)))
    quant = lambda v: lowbit.quantize(v, fmt, axis=-1, scale_mode=scale_mode)
    eager = quant(x)
    jitted = jax.jit(quant)(x)
    per_slice = [quantize(x[i], name, scale_mode=scale_mode) for i in range(x.shape[0])]
    mapped = jax.vmap(quant)(x)
    for field in ("data", "scale", "tensor_scale"):
        e, j, m = getattr(eager, field), getattr(jitted, field), getattr(mapped, field)
        if e is None:
            assert j is None and m is None
            continue
        np.testing.assert_array_equal(bits(j), bits(e))
        stacked = np.stack([np.asarray(getattr(s, field)) for s in per_slice])
        np.testing.assert_array_equal(bits(m), bits(stacked))


def test_qarray_is_a_pytree_through_jit():
    x = jnp.asarray(np.random.default_rng(43).standard_normal((4, 32)).astype(np.float32))
    q = quantize(x, "nvfp4")
    assert len(jax.tree_util.tree_leaves(q)) == 3
    assert len(jax.tree_util.tree_leaves(quantize(x, "mxfp8"))) == 2
    same = jax.jit(lambda a: a)(q)
    assert isinstance(same, lowbit.QArray)
    assert same.fmt == q.fmt and same.axis == q.axis and same.prescale == q.prescale
    np.testing.assert_array_equal(np.asarray(same.data).view(np.uint8), np.asarray(q.data).view(np.uint8))
    deq = jax.jit(lambda a: a.dequantize(jnp.float32))(q)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(q.dequantize(jnp.float32)))


# ----------------------------------------------------------------------------- FP4 packing


def test_pack_fp4_round_trip_and_nibble_order():
    e2m1 = ml_dtypes.float4_e2m1fn
    values = np.array([[1.0, -6.0, 0.5, -0.0], [6.0, 0.0, -1.5, 3.0]]).astype(e2m1)
    packed = np.asarray(lowbit.pack_fp4(jnp.asarray(values)))
    assert packed.dtype == np.uint8 and packed.shape == (2, 2)
    codes = values.view(np.uint8)
    np.testing.assert_array_equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4))  # even = low nibble
    assert packed[0, 0] == 0xF2  # 1.0 = 0b0010 low, -6.0 = 0b1111 high
    rng = np.random.default_rng(47)
    data = rng.choice(elem_grid(e2m1)[0], (3, 5, 64)) * rng.choice([-1, 1], (3, 5, 64))
    data = data.astype(e2m1)
    back = lowbit.unpack_fp4(lowbit.pack_fp4(jnp.asarray(data)))
    assert back.dtype == jnp.dtype(e2m1) and back.shape == data.shape
    np.testing.assert_array_equal(np.asarray(back).view(np.uint8), data.view(np.uint8))


def test_pack_fp4_odd_length_is_an_error():
    with pytest.raises(ValueError):
        lowbit.pack_fp4(jnp.zeros((3, 5), ml_dtypes.float4_e2m1fn))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_bad_dtype_is_a_type_error_naming_it(dtype):
    with pytest.raises(TypeError, match=jnp.dtype(dtype).name):
        lowbit.quantize(jnp.ones((32,), dtype), lowbit.MXFP8)


def test_unknown_rounding_and_scale_mode_list_choices():
    x = jnp.ones((32,), jnp.float32)
    with pytest.raises(ValueError) as err:
        lowbit.quantize(x, lowbit.MXFP8, rounding="up")
    assert "nearest" in str(err.value) and "stochastic" in str(err.value)
    with pytest.raises(ValueError) as err:
        lowbit.quantize(x, lowbit.MXFP8, scale_mode="ceil")
    assert "floor" in str(err.value) and "rceil" in str(err.value)


def test_round_to_grid_reference_self_check():
    """The reference's grid search agrees with ml_dtypes' own RNE cast on every f32 probe."""
    for elem in (ml_dtypes.float4_e2m1fn, ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn,
                 ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        probes = grid_probe_values(elem)
        np.testing.assert_array_equal(ref_round_to_grid(probes, elem),
                                      probes.astype(elem).astype(np.float64))
