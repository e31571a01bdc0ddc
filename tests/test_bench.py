"""lowbit.bench: CLI output (table + JSON) at the tiny size, the timing helper on a fake clock, stubs.

No timing thresholds: only structure, positivity and the median arithmetic are checked.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import bench


def _check_rows(payload, expected_labels, label_keys):
    rows = payload["rows"]
    assert [tuple(r[k] for k in label_keys) for r in rows] == expected_labels
    for row in rows:
        for key in ("median_ms", "compile_ms", "gb_s", "frac_copy", "x_copy_time"):
            assert math.isfinite(row[key]) and row[key] > 0, (row, key)
        assert row["median_ms"] == pytest.approx(float(np.median(row["times_ms"])))
        assert row["bytes"] > 0
        # GB/s is bytes / median time, fraction of copy is against the baseline of the same run
        assert row["gb_s"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)
        assert row["frac_copy"] == pytest.approx(row["gb_s"] / payload["baseline"]["gb_s"])
    assert payload["baseline"]["median_ms"] > 0
    env = payload["environment"]
    assert env["jax"] and env["jaxlib"] and env["date"] and env["platform"]


def test_quantize_tiny(tmp_path, capsys):
    path = tmp_path / "q.json"
    assert bench.main(["quantize", "--size", "tiny", "--repeats", "2", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "quantize" and payload["shape"] == list(bench.SIZES["tiny"])
    labels = [(case[0], op) for case in bench.QUANTIZE_CASES for op in ("quantize", "qdq")]
    _check_rows(payload, labels, ("format", "op"))
    rows, elems = payload["rows"], math.prod(bench.SIZES["tiny"])
    by_label = {(r["format"], r["op"]): r for r in rows}
    # bytes = bf16 input + outputs: qdq writes bf16; MXFP8 writes 1 byte per element + 1 per 32
    assert all(r["bytes"] == 4 * elems for r in rows if r["op"] == "qdq")
    assert by_label[("MXFP8 floor", "quantize")]["bytes"] == 2 * elems + elems + elems // 32
    assert by_label[("NVFP4 16x16", "quantize")]["bytes"] == 2 * elems + elems + elems // 256 + 4
    out = capsys.readouterr().out
    assert "lowbit bench quantize" in out and "jaxlib" in out and "of copy BW" in out
    for label, _, _ in bench.QUANTIZE_CASES:
        assert label in out


def test_hadamard_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default JSON path: ./bench_hadamard.json
    assert bench.main(["hadamard", "--size", "tiny", "--repeats", "2"]) == 0
    payload = json.loads((tmp_path / "bench_hadamard.json").read_text())
    labels = [(b, m) for b in bench.HADAMARD_BLOCKS for m in bench.HADAMARD_METHODS]
    _check_rows(payload, labels, ("block", "method"))
    assert set(payload["winner"]) == {str(b) for b in bench.HADAMARD_BLOCKS}
    assert set(payload["winner"].values()) <= set(bench.HADAMARD_METHODS)
    out = capsys.readouterr().out
    assert "lowbit bench hadamard" in out and "faster method per block" in out


class FakeClock:
    """Returns the given instants one per call."""

    def __init__(self, instants):
        self.instants = iter(instants)

    def __call__(self):
        return next(self.instants)


def test_time_fn_reports_the_median_of_controlled_timings():
    durations_s = [0.005, 0.001, 0.003, 0.100, 0.002]
    instants = []
    for i, d in enumerate(durations_s):
        instants += [10.0 * i, 10.0 * i + d]
    calls = []
    fn = lambda x: calls.append(x) or x
    timing = bench.time_fn(fn, [(1,), (2,), (3,)], repeats=5, warmup=2, clock=FakeClock(instants), jit=False)
    np.testing.assert_allclose(timing.times_ms, [5.0, 1.0, 3.0, 100.0, 2.0], rtol=1e-9)
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.compile_ms == 0.0
    assert calls == [1, 2] + [1, 2, 3, 1, 2]  # warm-up, then input sets rotated


def test_time_fn_times_compilation_apart():
    # jit: two clock reads around lower+compile, then two per repeat
    clock = FakeClock([0.0, 0.25, 1.0, 1.004, 2.0, 2.002, 3.0, 3.006])
    timing = bench.time_fn(lambda x: x * 2, [(jnp.ones(4),)], repeats=3, warmup=1, clock=clock)
    assert timing.compile_ms == pytest.approx(250.0)
    assert timing.median_ms == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least one input set"):
        bench.time_fn(lambda x: x, [], jit=False)
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench.time_fn(lambda x: x, [(1,)], repeats=0, jit=False)


def test_print_table_aligns_columns(capsys):
    rows = [{"name": "a", "ms": 1.5, "n": 3}, {"name": "long name", "ms": 12.25, "n": None}]
    text = bench.print_table(rows, [("name", "name", ""), ("ms", "ms", ".2f"), ("n", "count", "d")],
                             header=["title"])
    assert capsys.readouterr().out.rstrip("\n") == text
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["name", "ms", "count"]
    assert lines[3] == "a           1.50      3"
    assert lines[4] == "long name  12.25      -"


def test_write_json_handles_numpy_scalars(tmp_path):
    path = bench.write_json(tmp_path / "sub" / "x.json", {"a": np.float32(1.5), "b": (1, np.int64(2))})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}


def test_all_subcommands_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("quantize", "hadamard", "gemm", "grouped", "step"):
        assert name in out


def test_missing_extension_says_who_fills_it_in(monkeypatch, capsys):
    monkeypatch.setattr(bench, "EXTENSIONS", {"fakebench": "lowbit._no_such_bench_module"})
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["fakebench", "--size", "tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "filled in by the dot/model work" in err and "lowbit._no_such_bench_module does not exist" in err
