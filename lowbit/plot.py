"""Loss curves of several runs on one figure: `python -m lowbit.plot RUN_DIR ... -o curves.png`.

Reads each run's metrics.jsonl (written by lowbit.train); train rows are drawn smoothed with an
exponential moving average s_t = a s_{t-1} + (1 - a) x_t (bias-corrected, as TensorBoard), val
rows as markers. The legend names each run by its directory and the recipe in its config.yaml.
`--relative-to RUN_DIR` draws instead each run's gap to that reference, (s_run - s_ref) / s_ref at
the steps both logged: curves that overlap on the loss axis separate on this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, val rows) of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lowbit.train run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") != "val"], [r for r in rows if r.get("split") == "val"]


def run_label(run_dir: str | Path) -> str:
    """'<dir name> (<recipe>)' from the run's config.yaml header, else the directory name."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    config = run_dir / "config.yaml"
    if config.is_file():
        header = config.read_text().splitlines()[:1]
        for token in (header[0].split() if header else []):
            if token.startswith("recipe=") and token[len("recipe="):] != name:
                return f"{name} ({token[len('recipe='):]})"
    return name


def smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average with decay `weight` in [0, 1); NaNs are skipped."""
    out, average, norm = [], 0.0, 0.0
    for x in values:
        if np.isfinite(x):
            average, norm = weight * average + (1 - weight) * x, weight * norm + (1 - weight)
        out.append(average / norm if norm > 0 else np.nan)
    return np.asarray(out)


def relative_gap(rows: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], metric: str,
                 smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """(steps, gap): (s_run - s_ref) / s_ref of the smoothed `metric` at the steps both rows hold."""
    ref = {r["step"]: r[metric] for r in reference if metric in r}
    pairs = [(r["step"], r[metric], ref[r["step"]]) for r in rows if metric in r and r["step"] in ref]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0)
    steps, values, base = (np.asarray(column) for column in zip(*pairs, strict=True))
    run_s, ref_s = smooth(values, smoothing), smooth(base, smoothing)
    return steps, (run_s - ref_s) / ref_s


def _plot_absolute(axes: Any, run_dirs: Sequence[str | Path], metric: str, show_val: bool,
                   smoothing: float) -> None:
    for index, run_dir in enumerate(run_dirs):
        color = f"C{index % 10}"
        train_rows, val_rows = read_metrics(run_dir)
        label = run_label(run_dir)
        rows = [r for r in train_rows if metric in r]
        if rows:
            steps = [r["step"] for r in rows]
            axes.plot(steps, [r[metric] for r in rows], color=color, alpha=0.2, linewidth=0.8)
            axes.plot(steps, smooth([r[metric] for r in rows], smoothing), color=color, label=label)
        if show_val and val_rows:
            axes.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o--", color=color,
                      markersize=4, linewidth=0.8, label=f"{label} val" if rows else label)
    axes.set_ylabel(metric)


def _plot_relative(axes: Any, run_dirs: Sequence[str | Path], reference: str | Path, metric: str,
                   show_val: bool, smoothing: float) -> None:
    ref_train, ref_val = read_metrics(reference)
    for index, run_dir in enumerate(run_dirs):
        color, label = f"C{index % 10}", run_label(run_dir)
        train_rows, val_rows = read_metrics(run_dir)
        steps, gap = relative_gap(train_rows, ref_train, metric, smoothing)
        axes.plot(steps, 100 * gap, color=color, label=label)
        if show_val and val_rows:
            val_steps, val_gap = relative_gap(val_rows, ref_val, "val_loss", 0.0)
            axes.plot(val_steps, 100 * val_gap, "o--", color=color, markersize=4, linewidth=0.8,
                      label=f"{label} val")
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel(f"{metric}: gap to {run_label(reference)} (%)")


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, *, metric: str = "loss",
              show_val: bool = True, smoothing: float = 0.9, log_x: bool = False,
              relative_to: str | Path | None = None) -> Path:
    """Draw `metric` of every run (smoothed) and their val_loss points; save to `output`.

    With `relative_to` (a run directory): each run's relative gap to that run instead (see relative_gap).
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone (notebooks)

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    if relative_to is not None:
        _plot_relative(axes, run_dirs, relative_to, metric, show_val, smoothing)
    else:
        _plot_absolute(axes, run_dirs, metric, show_val, smoothing)
    axes.set_xlabel("step")
    if log_x:
        axes.set_xscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="lowbit.train work directories")
    parser.add_argument("-o", "--output", default="curves.png", help="image file (default: curves.png)")
    parser.add_argument("--metric", default="loss", help="train metric to draw (default: loss)")
    parser.add_argument("--val", action=argparse.BooleanOptionalAction, default=True,
                        help="draw validation loss points (default: yes)")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight in [0, 1) (default 0.9)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic step axis")
    parser.add_argument("--relative-to", metavar="RUN_DIR",
                        help="draw each run's relative gap to this run (e.g. the bf16 run) instead")
    args = parser.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    try:
        path = plot_runs(args.run_dirs, args.output, metric=args.metric, show_val=args.val,
                         smoothing=args.smoothing, log_x=args.log_x, relative_to=args.relative_to)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
