"""Benchmarks at CPU-tiny sizes (rows with positive times, failures recorded), lowbit.grouped vs
lax.ragged_dot, and the B200 roofline against a hand computation. No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import bench_gemm, bench_step
from lowbit.grouped import grouped_matmul
from lowbit.model import ModelConfig
from tests.reference_np import ref_ragged_dot

REPO = Path(__file__).resolve().parent.parent


def _ok_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    assert rows, "the benchmark wrote no rows"
    return rows


# ----------------------------------------------------------------------------- lowbit.grouped
@pytest.mark.parametrize("sizes,chunk,big", [
    ([7, 0, 33, 1, 9], 4, 16),      # empty group, group of one, rows past the total
    ([50, 0, 0, 0, 0], 8, None),    # everything in one group, single chunk size
    ([0, 0, 0, 0, 55], 3, 7),       # last group only: spill lands in the padding
    ([11, 11, 11, 11, 11], 64, 64),  # chunk larger than every group
])
def test_grouped_matmul_equals_ragged_dot(sizes, chunk, big):
    rng = np.random.default_rng(0)
    rows, k, n = 55, 24, 40
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    expected = ref_ragged_dot(x, w, sizes)
    got = grouped_matmul(x, w, gs, chunk=chunk, big_chunk=big)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
    got_enk = grouped_matmul(x, jnp.swapaxes(w, 1, 2), gs, rhs_layout="enk", chunk=chunk, big_chunk=big)
    np.testing.assert_allclose(np.asarray(got_enk), expected, rtol=1e-5, atol=1e-4)
    ragged = jax.lax.ragged_dot(x, w, gs, precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ragged), rtol=1e-5, atol=1e-4)


def test_grouped_matmul_gradients_equal_ragged_dot():
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([5, 0, 20, 3], jnp.int32)
    x = jnp.asarray(rng.normal(size=(30, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 16, 12)), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    grouped = lambda x, w: grouped_matmul(x, w, sizes, chunk=4, big_chunk=8)
    ours = jax.jit(jax.grad(loss(grouped), (0, 1)))(x, w)
    ref = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes, precision="highest")), (0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # rows past the groups get no gradient; an empty expert gets a zero weight gradient
    assert np.all(np.asarray(ours[0])[28:] == 0) and np.all(np.asarray(ours[1])[1] == 0)


def test_grouped_matmul_rejects_bad_input():
    x, w, gs = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([4, 4])
    with pytest.raises(ValueError, match="rhs_layout"):
        grouped_matmul(x, w, gs, rhs_layout="kn")
    with pytest.raises(ValueError, match="rhs_layout='enk'"):
        grouped_matmul(x, jnp.ones((2, 3, 5)), gs)
    with pytest.raises(TypeError, match="integers"):
        grouped_matmul(x, w, gs.astype(jnp.float32))


def test_capacity_matmul_drops_overflow_only():
    rng = np.random.default_rng(2)
    sizes = [6, 1, 3]
    x = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
    got = np.asarray(bench_gemm.capacity_matmul(x, jnp.swapaxes(w, 1, 2), jnp.asarray(sizes), 4, jnp.float32))
    expected = ref_ragged_dot(x, w, sizes)
    expected[4:6] = 0  # group 0 keeps its first 4 rows (capacity 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_zipf_group_sizes_sum_and_skew():
    sizes = bench_gemm.zipf_group_sizes(1000, 8, 2, exponent=1.0, seed=0)
    assert sizes.sum() == 2000 and sizes.max() <= 1000  # k distinct experts per token
    assert sizes[0] > sizes[-1]  # expert 0 is the most popular


# ----------------------------------------------------------------------------- tiny benchmark runs
def test_gemm_tiny_rows(tmp_path):
    out = tmp_path / "gemm.json"
    code = bench_gemm.main(["gemm", "--size", "tiny", "--shapes", "0", "--recipes", "bf16,fp8",
                            "--refs", "bf16,fp8,mxfp8", "--iters", "1", "--quantize-impls", "auto,fused",
                            "--json", str(out)])
    assert code == 0
    rows = _ok_rows(out)
    # one row per quantize implementation for each quantized backend; bf16 and the references: "-"
    assert sorted(r["quantize"] for r in rows if r["variant"] == "fp8") == ["auto", "auto", "fused", "fused"]
    by_variant = {(r["variant"], r["backend"]): r for r in rows if r.get("quantize") in ("-", "auto", None)}
    for key in [("bf16", "-"), ("fp8", "emulate"), ("fp8", "fp8"), ("ref bf16 fwd (TN)", "-")]:
        row = by_variant[key]
        assert row["status"] == "ok" and row["ms"] > 0 and row["tflops"] > 0
    assert by_variant[("bf16", "-")]["ratio"] == 1.0
    floor = by_variant[("ref fp8 3 GEMMs, operands pre-quantized (no quantize)", "-")]
    assert floor["status"] == "ok" and floor["ms"] > 0 and floor["pass"] == "fwd+bwd"
    # scaled_dot_general has no CPU lowering: the failure is a recorded row, not the end of the run
    failed = by_variant[("ref jax.nn.scaled_dot_general mxfp8 fwd", "-")]
    assert failed["status"] == "error" and failed["error"]


def test_fp8_floor_row_computes_the_recipes_three_products():
    """fp8_gemms_only = the fp8 recipe's fprop x.w^T [M,N], dgrad dy.w [M,K], wgrad dy^T.x [N,K] on the
    quantized values (float64 reference of the same FP8 values; bf16 output: 2^-8 relative)."""
    m, k, n = 48, 32, 40
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(m, k), (n, k), (m, n)]
    x, w, dy = (jax.random.normal(kk, shape, jnp.bfloat16) for kk, shape in zip(keys, shapes, strict=True))
    x8, w8, wt8, dy8, dyt8, xt8 = bench_gemm.fp8_gemm_operands(x, w, dy)
    assert (x8.dtype, dy8.dtype) == (jnp.float8_e4m3fn, jnp.float8_e5m2)
    np.testing.assert_array_equal(np.asarray(wt8, np.float32), np.asarray(w8, np.float32).T)
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x8, w8, dy8))
    for got, want in zip(bench_gemm.fp8_gemms_only(x8, w8, wt8, dy8, dyt8, xt8),
                         [x64 @ w64.T, dy64 @ w64, dy64.T @ x64], strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8,
                                   atol=2**-8 * np.abs(want).max())


def test_gemm_time_budget_skips(tmp_path):
    out = tmp_path / "gemm.json"
    bench_gemm.main(["gemm", "--size", "tiny", "--shapes", "0", "--recipes", "bf16", "--refs", "none",
                     "--time-budget-s", "0", "--json", str(out)])
    rows = _ok_rows(out)
    assert all(r["status"] == "skipped" for r in rows)


def test_grouped_tiny_rows(tmp_path):
    out = tmp_path / "grouped.json"
    code = bench_gemm.main(["grouped", "--size", "tiny", "--configs", "e8k2", "--dtypes", "bf16,fp8",
                            "--variants", "dense,ragged_dot,capacity,grouped", "--chunks", "16:64",
                            "--passes", "fwd",
                            "--iters", "1", "--json", str(out)])
    assert code == 0
    rows = _ok_rows(out)
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), [r.get("error") for r in rows]
    grouped = [r for r in rows if r["variant"].startswith("lowbit.grouped") and r["pass"] == "fwd"]
    assert len(grouped) == 2  # bf16 and fp8
    assert all(r["relerr_vs_ragged"] < 1e-2 for r in grouped)  # dropless: same output as ragged_dot
    capacity = [r for r in rows if r["variant"].startswith("capacity") and r["pass"] == "fwd"]
    assert capacity[0]["dropped_at_cf"] > 0 and capacity[0]["relerr_vs_ragged"] > 1e-2  # Zipf routing drops


def test_step_tiny_rows(tmp_path):
    out = tmp_path / "step.json"
    code = bench_step.main(["step", "--size", "tiny", "--configs", "tiny", "--recipes", "bf16",
                            "--steps", "2",
                            "--override", "num_decoder_layers=1", "--override", "ici_fsdp=1",
                            "--json", str(out)])
    assert code == 0
    row = _ok_rows(out)[0]
    assert row["status"] == "ok", row.get("error")
    assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["ratio"] == 1.0
    assert row["temp_size_in_bytes"] >= 0 and np.isfinite(row["loss"])
    assert (row["moe_impl"], row["attention"]) == ("dropless", "xla")  # tiny's MoE path; auto on a CPU
    assert row["devices"] == 1 and row["peak_gb"] is None  # the CPU reports no peak memory


def test_step_rows_per_quantize_implementation(tmp_path):
    """--quantize-impls xla,fused: the fp8 recipe's step traced once per switch (the switch is not in
    jit's cache key, so each is compiled afresh), same model, so the same loss to float32 rounding."""
    out = tmp_path / "step.json"
    code = bench_step.main(["step", "--size", "tiny", "--configs", "tiny", "--recipes", "fp8", "--steps", "1",
                            "--override", "num_decoder_layers=1", "--isolate", "none",
                            "--quantize-impls", "xla,fused", "--json", str(out)])
    assert code == 0
    rows = _ok_rows(out)
    assert [(r["recipe"], r["quantize"], r["status"]) for r in rows] == [
        ("bf16", "-", "ok"), ("fp8", "xla", "ok"), ("fp8", "fused", "ok")]
    assert rows[1]["compile_s"] > 0 and rows[2]["compile_s"] > 0
    assert abs(rows[1]["loss"] - rows[2]["loss"]) < 1e-4
    with pytest.raises(ValueError, match="choose from"):
        bench_gemm.parse_quantize_impls("auto,triton")


class _FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_step_peak_memory_is_the_largest_over_the_steps_devices():
    devices = [_FakeDevice({"peak_bytes_in_use": 5}), _FakeDevice(None),
               _FakeDevice({"peak_bytes_in_use": 9})]
    assert bench_step.peak_device_bytes(devices) == 9
    assert bench_step.peak_device_bytes([_FakeDevice(None), _FakeDevice({})]) is None


def test_blackwell_aot_cpu_says_it_needs_cuda():
    command = [sys.executable, str(REPO / "tools" / "blackwell_aot.py"), "--out", "/tmp/aot-test"]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA jaxlib" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- roofline
def test_roofline_matches_hand_computation():
    # One dense layer, emb 32, MLP 64, 2 heads x 16 (no GQA), vocab 256, T = 16.
    cfg = ModelConfig(vocab_size=256, max_target_length=16, emb_dim=32, mlp_dim=64, num_query_heads=2,
                      num_kv_heads=2, head_dim=16, num_decoder_layers=1, num_experts=0)
    hw = bench_step.B200
    body = 2 * (4 * 32 * 32 + 3 * 32 * 64)  # q, k, v, o + wi_0, wi_1, wo forward FLOPs per token
    head = 2 * 32 * 256  # logits_dense: kept in BF16 by the recipe's rules
    attention = 3 * 2 * 16 * 32  # causal QK^T + PV (2·T·H·Dh), fwd + 2x bwd, BF16
    bf16 = bench_step.roofline(cfg, "bf16", hw, tokens_per_step=16)
    assert bf16["gemm_s"] == pytest.approx((3 * body + 3 * head + attention) / hw.bf16, rel=1e-12)
    mxfp8 = bench_step.roofline(cfg, "mxfp8", hw, tokens_per_step=16)
    assert mxfp8["gemm_s"] == pytest.approx(3 * body / hw.fp8 + (3 * head + attention) / hw.bf16, rel=1e-12)
    mxfp4 = bench_step.roofline(cfg, "mxfp4", hw, tokens_per_step=16)  # forward BF16, backward FP4
    expected = body / hw.bf16 + 2 * body / hw.fp4 + (3 * head + attention) / hw.bf16
    assert mxfp4["gemm_s"] == pytest.approx(expected, rel=1e-12)
    # nvfp4 keeps the last ceil(0.15 * 1) = 1 layer in BF16: all GEMMs at the BF16 rate here.
    nvfp4 = bench_step.roofline(cfg, "nvfp4", hw, tokens_per_step=16)
    assert nvfp4["gemm_s"] == pytest.approx(bf16["gemm_s"], rel=1e-12)
    # The optimizer's per-step bytes are amortised over the step's tokens.
    from lowbit.model import num_params
    half_batch = bench_step.roofline(cfg, "bf16", hw, tokens_per_step=8)
    extra = half_batch["bytes_per_token"] - bf16["bytes_per_token"]
    assert extra == pytest.approx(num_params(cfg) * bench_step.OPTIMIZER_BYTES_PER_PARAM * (1 / 8 - 1 / 16))
    assert bf16["memory_s"] == pytest.approx(bf16["bytes_per_token"] / hw.hbm)


def test_step_measures_on_real_data_batches_when_asked():
    overrides = ("num_decoder_layers=1", "ici_fsdp=1")
    data_row = bench_step.measure_step("tiny", "bf16", 1, overrides=overrides, tokens="data")
    random_row = bench_step.measure_step("tiny", "bf16", 1, overrides=overrides, tokens="random")
    # Same initial weights and step, different batches: the losses differ (the option is not ignored).
    assert np.isfinite(data_row["loss"]) and data_row["loss"] != random_row["loss"]
    with pytest.raises(ValueError, match="tokens must be one of"):
        bench_step.measure_step("tiny", "bf16", 1, tokens="text")
