"""Execute every notebook in notebooks/ and check that it ran cleanly and drew what it promises.

The kernel is this interpreter (`sys.executable -m ipykernel_launcher`), declared in a temporary
kernel spec put first on JUPYTER_PATH: a fresh CI venv, a user-level `python3` spec pointing at
another Python, or no installed spec at all cannot make the notebooks run elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "lowbit-test-python"
TIMEOUT_S = 300  # per cell, against hangs only: whole notebooks take 10-30 s (CPU time) on 2 cores


@pytest.fixture
def kernel_name(tmp_path_factory, monkeypatch) -> str:
    """A kernel spec named KERNEL_NAME that launches this very interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "lowbit tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL_NAME


def execute(name: str, kernel_name: str, parameters: str = "") -> nbformat.NotebookNode:
    """Run notebooks/<name> (from the notebooks directory) with an optional parameters cell injected."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if parameters:
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        if not tagged:
            raise AssertionError(f"{name} has no cell tagged 'parameters' to override")
        nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the traceback if any cell fails
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """(all printed text, number of PNG figures) of an executed notebook."""
    text, figures = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                text.append(out["text"])
            elif out["output_type"] in ("display_data", "execute_result"):
                figures += "image/png" in out.get("data", {})
                text.append(out.get("data", {}).get("text/plain", ""))
            elif out["output_type"] == "error":
                raise AssertionError(f"cell error: {out['ename']}: {out['evalue']}")
    return "\n".join(text), figures


def summary_table(text: str) -> list[list[str]]:
    """Rows (split on whitespace) printed after the line starting with 'SUMMARY'."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SUMMARY"))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_kernel_runs_this_interpreter(kernel_name):
    """The notebooks run in the test's own environment (a fresh CI venv included)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=TIMEOUT_S).execute()
    text, _ = outputs(nb)
    assert Path(text.strip()).absolute() == Path(sys.executable).absolute()


def test_notebook_sources_are_generated_from_build_script(tmp_path):
    """The committed .ipynb files are exactly what notebooks/_build.py writes (and have no outputs)."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import _build
    finally:
        sys.path.remove(str(NOTEBOOKS))
    _build.main(["_build.py", str(tmp_path)])
    for filename in _build.NOTEBOOKS:
        committed = nbformat.read(NOTEBOOKS / filename, as_version=4)
        assert nbformat.read(tmp_path / filename, as_version=4) == committed, (
            f"{filename} differs from notebooks/_build.py: run `python notebooks/_build.py`")
        assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")


@pytest.mark.slow
def test_01_formats(kernel_name):
    text, figures = outputs(execute("01_formats.ipynb", kernel_name))
    assert figures >= 5
    assert "E2M1 grid: [0.  0.5 1.  1.5 2.  3.  4.  6. ]" in text
    table = {row[0]: (np.array(row[1::2], float), np.array([v.strip("(%)") for v in row[2::2]], float) / 100)
             for row in summary_table(text)}
    assert set(table) == {"FP8-tensor", "MXFP8", "MXFP8-rceil", "MXFP6-E2M3", "MXFP4", "NVFP4"}, table
    sqnr, row_err = {k: v[0] for k, v in table.items()}, {k: v[1] for k, v in table.items()}
    # columns: normal, student-t(3), lognormal, normal+outliers, row scales 2^±12
    assert np.all(sqnr["MXFP8-rceil"] > 30) and np.all(sqnr["MXFP8-rceil"] >= sqnr["MXFP8"] - 0.05)
    assert 15 < sqnr["MXFP4"][0] < sqnr["NVFP4"][0] < 25
    assert row_err["FP8-tensor"][4] > 0.1 > 0.05 > row_err["MXFP8"][4]  # per-tensor scale loses small rows


@pytest.mark.slow
def test_02_sr_and_hadamard(kernel_name):
    text, figures = outputs(execute("02_sr_and_hadamard.ipynb", kernel_name))
    assert figures >= 3
    assert "SR never moves more than one grid step: True" in text
    rht_changes_product = float(text.split("RHT alone (no quantization) changes A·B by ")[1].split()[0])
    assert rht_changes_product < 1e-5  # orthonormal and shared by both operands: A'B' = AB
    rows = {(row[0], row[1]): [float(v.rstrip("x")) for v in row[2:]] for row in summary_table(text)}
    assert {fmt for fmt, _ in rows} == {"MXFP4", "NVFP4", "MXFP8"} and len(rows) == 6
    # GEMM error ordering by element precision, and MXFP4 (power-of-two scales, blocks of 32) is the
    # format the RHT helps on outliers (NVFP4's small E4M3-scaled blocks already isolate them).
    for data in ("outliers", "student-t"):
        assert rows["MXFP8", data][0] < rows["NVFP4", data][0] < rows["MXFP4", data][0]
    assert rows["MXFP4", "outliers"][1] < rows["MXFP4", "outliers"][0]


@pytest.mark.slow
def test_03_drop_in(kernel_name):
    text, figures = outputs(execute("03_drop_in.ipynb", kernel_name))
    assert figures >= 1
    for recipe in ("mxfp8", "nvfp4"):
        for layer in ("hidden", "out"):
            assert f"{recipe}: {layer}" in text and f"-> {recipe}" in text
    rows = {row[0]: (float(row[1]), float(row[2])) for row in summary_table(text)}
    assert set(rows) == {"bf16", "mxfp8", "nvfp4"}
    for name, (first, final) in rows.items():
        assert final < 0.5 * first, f"{name} did not learn the teacher: {first} -> {final}"
    assert abs(rows["mxfp8"][1] - rows["bf16"][1]) / rows["bf16"][1] < 0.1


@pytest.mark.slow
def test_04_convergence_trains_its_own_runs(kernel_name, tmp_path):
    root = tmp_path / "study"
    text, figures = outputs(execute("04_convergence.ipynb", kernel_name, f"RUN_ROOT = {str(root)!r}"))
    assert figures >= 2
    assert "no runs found" in text
    rows = {row[0]: row for row in summary_table(text)}
    assert set(rows) == {"bf16", "mxfp8"}
    assert rows["bf16"][1] == rows["mxfp8"][1] == "20"
    assert (root / "mxfp8" / "metrics.jsonl").is_file()
