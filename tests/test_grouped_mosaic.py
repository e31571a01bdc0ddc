"""lowbit.kernels.grouped_mosaic on the CPU: Pallas's Mosaic GPU interpreter against a float64 NumPy reference
(16-bit operands with rhs [E, K, N], since the interpreter has no transposed WGMMA operand; the one-warpgroup
and the warp-specialized kernels), the FP8 K-major kernels lowered for CUDA (Mosaic GPU checks the WGMMA
operands while lowering), and the input errors.
The GPU check of every dtype and layout: tools/grouped_mosaic_check.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.kernels.grouped_mosaic import _tile_order, group_boundaries, grouped_matmul_mosaic


def _reference(x: np.ndarray, w: np.ndarray, sizes: list[int], scale: float) -> tuple[np.ndarray, int]:
    """float64 out[t] = scale · x[t] · w[g(t)], zeros past the groups; returns (out, rows covered)."""
    m = x.shape[0]
    out = np.zeros((m, w.shape[2]))
    start = 0
    for e, size in enumerate(sizes):
        end = min(start + size, m)
        out[start:end] = x[start:end].astype(np.float64) @ w[e].astype(np.float64)
        start = end
    return scale * out, start


def _interpret(x, w, gs, **kwargs):
    try:
        return grouped_matmul_mosaic(x, w, gs, rhs_layout="ekn", interpret=True, **kwargs)
    except NotImplementedError as err:  # a jax without the GPU interpreter
        pytest.skip(str(err))


@pytest.mark.parametrize("sizes", [
    [37, 0, 100, 40],   # unaligned boundaries, an empty group, 23 rows past the groups (zeros)
    [64, 64, 0, 72],    # boundaries on the 64-row blocks
    [150, 120],         # sum > M: the last group's rows past M are dropped (lax.ragged_dot's rule)
])
def test_interpreted_kernel_matches_float64_reference(sizes):
    rng = np.random.default_rng(len(sizes))
    m, k, n = 200, 128, 256
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.bfloat16)
    got = np.asarray(_interpret(x, w, jnp.asarray(sizes, jnp.int32), scale=0.5, tile=(64, 128, 64),
                                warp_specialized=False, num_sms=2), np.float32)
    ref, covered = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, 0.5)
    assert got.dtype == np.float32 and got.shape == (m, n)
    # f32 accumulation of exact bf16 products, rounded once to bf16: within 2^-8 relative (+ f32 slack)
    np.testing.assert_allclose(got, ref, rtol=2.0 ** -8, atol=1e-4)
    assert np.all(got[covered:] == 0.0)


@pytest.mark.parametrize("sizes", [[37, 0, 100, 40], [150, 120]])
def test_interpreted_warp_specialized_kernel_matches_float64_reference(sizes):
    """One TMA warpgroup + two WGMMA warpgroups (64 + 64 columns), stored in 32-column chunks; two CTAs."""
    rng = np.random.default_rng(10 + len(sizes))
    m, k, n = 200, 128, 256
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.bfloat16)
    got = np.asarray(_interpret(x, w, jnp.asarray(sizes, jnp.int32), scale=0.5, tile=(64, 64, 64),
                                warp_specialized=True, epi_n=32, num_sms=2), np.float32)
    ref, covered = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, 0.5)
    np.testing.assert_allclose(got, ref, rtol=2.0 ** -8, atol=1e-4)
    assert np.all(got[covered:] == 0.0)


@pytest.mark.parametrize("warp_specialized", [False, True])
def test_rows_past_the_groups_stay_zero_under_a_nan_scale(warp_specialized):
    """A NaN tensor scale (non-finite input upstream) must not leak into rows no group owns."""
    x = jnp.ones((128, 64), jnp.bfloat16)
    w = jnp.ones((2, 64, 128), jnp.bfloat16)
    got = np.asarray(_interpret(x, w, jnp.asarray([30, 40], jnp.int32), scale=jnp.nan, tile=(64, 64, 64),
                                warp_specialized=warp_specialized, num_sms=2), np.float32)
    assert np.all(np.isnan(got[:70])) and np.all(got[70:] == 0.0)


def test_interpreted_kernel_output_dtype_and_unscaled():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((96, 64)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((2, 64, 128)), jnp.float16)
    got = _interpret(x, w, jnp.asarray([40, 56], jnp.int32), preferred_element_type=jnp.float32,
                     tile=(64, 64, 64), epi_n=32, num_sms=2)
    assert got.dtype == jnp.float32
    ref, _ = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), [40, 56], 1.0)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_interpreted_kernel_pads_rows_to_a_multiple_of_8():
    """M = 203: Mosaic GPU needs 8-row multiples; the wrapper pads lhs and slices the result."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((203, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 64, 128)), jnp.bfloat16)
    got = _interpret(x, w, jnp.asarray([100, 150], jnp.int32), tile=(64, 64, 64), epi_n=64, num_sms=2)
    ref, _ = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), [100, 150], 1.0)
    assert got.shape == (203, 128)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2.0 ** -8, atol=1e-4)


@pytest.mark.parametrize("band", [None, 1, 2, 6])
def test_tile_order_visits_every_tile_once_in_bands(band):
    rows, n_blocks = 5, 6
    lin = jnp.arange(rows * n_blocks, dtype=jnp.int32)
    t, ni = (np.asarray(v) for v in _tile_order(lin, rows, n_blocks, band))
    visited = sorted(zip(t.tolist(), ni.tolist(), strict=True))
    assert visited == [(r, c) for r in range(rows) for c in range(n_blocks)]
    width = n_blocks if band is None else band
    np.testing.assert_array_equal(ni // width, np.arange(rows * n_blocks) // (width * rows))  # band by band
    if band is None:  # N blocks innermost, as before bands existed
        np.testing.assert_array_equal(t, np.arange(rows * n_blocks) // n_blocks)


def test_interpreted_kernel_with_one_n_block_bands():
    rng = np.random.default_rng(5)
    sizes = [70, 0, 90]
    x = jnp.asarray(rng.standard_normal((160, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 64, 256)), jnp.bfloat16)
    got = np.asarray(_interpret(x, w, jnp.asarray(sizes, jnp.int32), tile=(64, 64, 64), band=1, num_sms=2),
                     np.float32)
    ref, _ = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes, 1.0)
    np.testing.assert_allclose(got, ref, rtol=2.0 ** -8, atol=1e-4)
    with pytest.raises(ValueError, match="must divide the 2 N blocks"):
        grouped_matmul_mosaic(x, w, jnp.asarray(sizes, jnp.int32), rhs_layout="ekn", tile=(64, 64, 64),
                              band=3)


def test_group_boundaries_clip_and_close_with_the_zero_group():
    b = group_boundaries(jnp.asarray([3, 0, 10, 4], jnp.int32), 12)
    np.testing.assert_array_equal(np.asarray(b), [0, 3, 3, 12, 12, 12])


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("warp_specialized", [False, True])
def test_fp8_k_major_kernel_lowers_for_cuda(dtype, warp_specialized):
    x = jax.ShapeDtypeStruct((512, 256), dtype)
    w = jax.ShapeDtypeStruct((4, 256, 256), dtype)  # [E, N, K]
    gs = jax.ShapeDtypeStruct((4,), jnp.int32)
    fn = jax.jit(lambda a, b, g: grouped_matmul_mosaic(a, b, g, scale=2.0, num_sms=132, tile=(128, 128, 128),
                                                       warp_specialized=warp_specialized))
    text = fn.trace(x, w, gs).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "tensor<512x256xbf16>" in text


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_default_settings_fit_the_shared_memory(out_dtype):
    """4 stages of 128x128 + 256x128 FP8 boxes (192 KiB) plus the store chunks must fit Hopper's 227 KiB:
    Mosaic GPU checks it while lowering. A float32 output halves the chunk width (epi_n 32)."""
    x = jax.ShapeDtypeStruct((4096, 1024), jnp.float8_e4m3fn)
    w = jax.ShapeDtypeStruct((8, 2048, 1024), jnp.float8_e4m3fn)
    gs = jax.ShapeDtypeStruct((8,), jnp.int32)
    fn = jax.jit(lambda a, b, g: grouped_matmul_mosaic(a, b, g, preferred_element_type=out_dtype,
                                                       num_sms=132))
    fn.trace(x, w, gs).lower(lowering_platforms=("cuda",))  # raises "exceeds available shared memory" if not
    too_wide = jax.jit(lambda a, b, g: grouped_matmul_mosaic(a, b, g, preferred_element_type=jnp.float32,
                                                             epi_n=128, num_sms=132))
    with pytest.raises(ValueError, match="shared memory"):
        too_wide.trace(x, w, gs).lower(lowering_platforms=("cuda",))


def test_bad_inputs_name_the_fix():
    x8 = jnp.zeros((64, 128), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="K-major"):
        grouped_matmul_mosaic(x8, jnp.zeros((2, 128, 128), jnp.float8_e4m3fn), jnp.asarray([32, 32]),
                              rhs_layout="ekn")
    with pytest.raises(TypeError, match="cast them first"):
        grouped_matmul_mosaic(x8, jnp.zeros((2, 128, 128), jnp.bfloat16), jnp.asarray([32, 32]))
    with pytest.raises(ValueError, match="multiples of bk"):
        grouped_matmul_mosaic(jnp.zeros((64, 96), jnp.bfloat16), jnp.zeros((2, 256, 96), jnp.bfloat16),
                              jnp.asarray([32, 32]))
    with pytest.raises(ValueError, match="twice for the two warpgroups"):
        grouped_matmul_mosaic(x8, jnp.zeros((2, 384, 128), jnp.float8_e4m3fn), jnp.asarray([32, 32]),
                              tile=(128, 256, 128), warp_specialized=True)
    with pytest.raises(ValueError, match="rhs_layout"):
        grouped_matmul_mosaic(x8, jnp.zeros((2, 128, 128), jnp.float8_e4m3fn), jnp.asarray([32, 32]),
                              rhs_layout="nk")


# ----------------------------------------------------------------------------- lowbit.dot's choice of kernel
def test_grouped_fp8_kernel_choice(monkeypatch):
    from lowbit.dot import _grouped_fp8_kernel

    e4 = jnp.zeros((64, 256), jnp.float8_e4m3fn)
    w_enk = jnp.zeros((2, 512, 256), jnp.float8_e4m3fn)
    monkeypatch.setenv("LOWBIT_GROUPED_FP8", "mosaic")
    assert _grouped_fp8_kernel(e4, w_enk, "enk") == "mosaic"
    # mixed e5m2 x e4m3 (the dgrad), N not a multiple of 256, and 16-bit operands stay on Triton
    assert _grouped_fp8_kernel(e4.astype(jnp.float8_e5m2), w_enk, "enk") == "triton"
    assert _grouped_fp8_kernel(e4, jnp.zeros((2, 384, 256), jnp.float8_e4m3fn), "enk") == "triton"
    assert _grouped_fp8_kernel(e4.astype(jnp.bfloat16), w_enk.astype(jnp.bfloat16), "enk") == "triton"
    monkeypatch.setenv("LOWBIT_GROUPED_FP8", "auto")
    assert _grouped_fp8_kernel(e4, w_enk, "enk") == ("mosaic" if jax.devices()[0].platform == "gpu" and str(
        getattr(jax.devices()[0], "compute_capability", "")).startswith("9") else "triton")
    monkeypatch.setenv("LOWBIT_GROUPED_FP8", "cutlass")
    with pytest.raises(ValueError, match="LOWBIT_GROUPED_FP8 must be one of"):
        _grouped_fp8_kernel(e4, w_enk, "enk")


def test_fp8_recipe_grouped_forward_lowers_to_the_mosaic_kernel(monkeypatch):
    """ragged_dot(recipe="fp8", impl="pallas") for CUDA: the forward is one Mosaic GPU call, scales inside."""
    from lowbit.dot import ragged_dot

    monkeypatch.setenv("LOWBIT_GROUPED_FP8", "mosaic")
    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 512, 512), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((4,), jnp.int32)
    fn = jax.jit(lambda a, b, g: ragged_dot(a, b, g, recipe="fp8", impl="pallas"))
    text = fn.trace(x, w, gs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and "tensor<1024x512xbf16>" in text


def test_bench_mosaic_tile_specs():
    from lowbit.bench_gemm import parse_mosaic_tiles

    assert parse_mosaic_tiles("128:128:128:4:ws:b8,64:256:128") == [(128, 128, 128, 4, True, 8),
                                                                     (64, 256, 128, 4, False, None)]
    for bad in ("128:128", "128:128:128:4:xs", "128:128:128:b2:b4"):
        with pytest.raises(ValueError, match="is not bm:bn:bk"):
            parse_mosaic_tiles(bad)
