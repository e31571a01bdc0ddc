"""tools/step_gap.py's trace readers on synthetic input: HLO source per kernel name, kernel categories."""

# ruff: noqa: E501  (DUMP holds HLO text lines as XLA writes them)
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

STEP_GAP = runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "step_gap.py"))

# The shapes of lines in XLA's optimized-HLO text dump: a fused computation with op_name metadata, a fusion
# whose own metadata is empty, a multi-output fusion and a cuBLAS custom call returning tuples.
DUMP = """HloModule jit_step, entry_computation_layout={()->()}

%fused_computation.7 (param_0.1: bf16[64,32]) -> f8e4m3fn[64,32] {
  %param_0.1 = bf16[64,32]{1,0} parameter(0)
  ROOT %convert.3 = f8e4m3fn[64,32]{1,0} convert(%param_0.1), metadata={op_name="jit(step)/jvp(_quantize_jit)/convert_element_type"}
}

ENTRY %main.9 (p0: bf16[64,32], p1: f8e4m3fn[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %loop_convert_fusion.14 = f8e4m3fn[64,32]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.7
  %input_reduce_fusion.2 = (f32[], bf16[64,32]{1,0}) fusion(%p0), kind=kInput, calls=%fused_computation.7, metadata={op_name="jit(step)/reduce_max"}
  %cublas-gemm.1 = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%loop_convert_fusion.14, %p1), custom_call_target="__cublas$lt$matmul$f8", metadata={op_name="jit(step)/dot_general"}
  ROOT %get-tuple-element.5 = bf16[64,16]{1,0} get-tuple-element(%cublas-gemm.1), index=0
}
"""


def test_hlo_sources_names_fusions_tuples_and_custom_calls(tmp_path):
    (tmp_path / "module_0054.jit_step.sm_9.0_gpu_after_optimizations.txt").write_text(DUMP)
    (tmp_path / "module_0001.jit_other.sm_9.0_gpu_after_optimizations.txt").write_text("")
    sources = STEP_GAP["hlo_sources"](tmp_path)
    # no op_name of its own: its fused computation's
    assert sources["loop_convert_fusion_14"] == (
        "kLoop f8e4m3fn[64,32]{1,0} | jit(step)/jvp(_quantize_jit)/convert_element_type")
    assert sources["input_reduce_fusion_2"].startswith("kInput (f32[], bf16[64,32]{1,0})")
    assert sources["input_reduce_fusion_2"].endswith("| jit(step)/reduce_max")
    assert sources["cublas_gemm_1"].startswith("__cublas$lt$matmul$f8 (bf16[64,16]")
    assert STEP_GAP["hlo_sources"](tmp_path / "missing") == {}


@pytest.mark.parametrize("name, category", [
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention (cuDNN)"),
    ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT", "gemm (cuBLAS / XLA Triton GEMM)"),
    ("void splitKreduce_kernel<32, 16, int, float>", "gemm (cuBLAS / XLA Triton GEMM)"),
    ("gemm_fusion_dot_376", "gemm (cuBLAS / XLA Triton GEMM)"),
    ("lowbit_grouped_wgrad__2", "lowbit Pallas kernels"),
    ("input_scatter_fusion_22", "scatter / sort / gather"),
    ("wrapped_transpose_94", "transpose / copy"),
    ("input_reduce_fusion_185", "reduction fusions"),
    ("loop_convert_fusion_14", "other XLA fusions"),
    ("some_unknown_kernel", "other"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collectives (NCCL)"),
    ("ncclDevKernel_AllGather_RING_LL", "collectives (NCCL)"),
    ("all-reduce-start_3", "collectives (NCCL)"),
])
def test_kernel_categories(name, category):
    assert STEP_GAP["kernel_categories"]([(name, 2.0, 1)]) == [(category, 2.0)]


def test_kernel_categories_sum_per_category_largest_first():
    events = [("nvjet_a", 1.0, 1), ("loop_add_fusion", 0.5, 2), ("nvjet_b", 2.0, 3), ("wrapped_transpose", 4.0, 1)]
    assert STEP_GAP["kernel_categories"](events) == [
        ("transpose / copy", 4.0), ("gemm (cuBLAS / XLA Triton GEMM)", 3.0), ("other XLA fusions", 0.5)]


def test_fp8acc_accuracy_reference_on_cpu(tmp_path, monkeypatch):
    """tools/fp8acc_accuracy.py's float64 reference: on the CPU both GEMMs accumulate FP8 products in f32,
    so every error is at f32 rounding level; the rows past the groups' total must come back as zeros."""
    import json
    import sys

    out = tmp_path / "acc.json"
    monkeypatch.setattr(sys, "argv", ["fp8acc_accuracy.py", "--settings", "none", "--shapes", "64x256x32",
                                      "--tile", "16:32:32:4:2", "--json", str(out)])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "fp8acc_accuracy.py"),
                   run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"][:6] for r in rows] == ["XLA FP", "pallas"]
    for row in rows:
        assert 0 <= row["rel_rms_err"] < 1e-6 and 0 <= row["rel_max_err"] < 1e-6, row


def test_bench_fp8_cast_runs_on_cpu_and_checks_bits(tmp_path, monkeypatch):
    """tools/bench_fp8_cast.py at its tiny size (Pallas interpret mode): every variant times, and the
    kernel's bits (both layouts) equal lowbit.quantize's; the scaled cast's tiles (packed transposed
    copy or not) all give the default tile's bits."""
    import json
    import sys

    out = tmp_path / "cast.json"
    monkeypatch.setattr(sys, "argv", ["bench_fp8_cast.py", "--size", "tiny", "--n", "1", "--repeats", "1",
                                      "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "bench_fp8_cast.py"),
                       run_name="__main__")
    assert done.value.code == 0
    rows = json.loads(out.read_text())["rows"]
    # 15 = 3 references + 4 tiles x 3 kernel variants; then one scaled row per tile setting
    assert len(rows) == 15 + 9 and all("error" not in r and r["ms"] > 0 for r in rows), rows
    assert sum(r.get("pack_transpose", False) for r in rows) == 6
    assert {r["bit_mismatches"] for r in rows} == {0}


def test_fp8_cast_parity_runs_on_cpu(tmp_path, monkeypatch):
    """tools/fp8_cast_parity.py --size tiny: the kernel (interpret mode, both encoders) matches
    lowbit.quantize's bits, poisoned tensors and every FP8 midpoint included, and the fp8 GEMMs traced with the switch "fused" contain the cast kernel
    (the "xla" ones none) and give the same outputs."""
    import json
    import sys

    out = tmp_path / "parity.json"
    monkeypatch.setattr(sys, "argv", ["fp8_cast_parity.py", "--size", "tiny", "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "fp8_cast_parity.py"),
                       run_name="__main__")
    assert done.value.code == 0
    rows = json.loads(out.read_text())
    casts = [r for r in rows if r["check"].startswith("cast")]
    dots = [r for r in rows if r["check"].startswith("dot")]
    # 2 encoders x (2 shapes x clean/NaN + 2 formats' midpoints)
    assert len(casts) == 12 and all(r["mismatches"] == 0 and r["scale_equal"] for r in casts)
    # MXFP8 E4M3/E5M2 by the convert and the magic add, MXFP4 by the magic add and the compares
    mx = [r for r in rows if r["check"].startswith("mx kernel")]
    assert len(mx) == 6 and all(r["ok"] for r in mx)
    # fp8: y, dx, dw; fp8-delayed: the same and the next amax history
    assert len(dots) == 7 and all(r["cast_kernels"]["fused"] >= 3 and r["cast_kernels"]["xla"] == 0
                                  for r in dots)
    assert all(r["max_rel_diff"] < 1e-2 for r in dots)  # bf16 outputs; dW's float32 order may differ
    assert all(r["mismatches"] == 0 for r in dots if not r["case"].endswith(" dw"))
    # delayed scaling's cast: 2 encoders x 2 shapes x clean/NaN x (saturating, headroom) scales
    scaled = [r for r in rows if r["check"].startswith("scaled cast")]
    assert len(scaled) == 16 and all(r["ok"] for r in scaled)
