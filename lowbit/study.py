"""Recipe study: train one config under several recipes and compare the loss curves.

`python -m lowbit.study --config small --steps 2000 --workdir runs/study [--recipes bf16,nvfp4]
[--jobs 9] [--time-budget-s 540] [key=value ...]` trains every recipe with the same seed (same
initial weights) and the same data order, each in WORKDIR/<recipe>. Calls resume: finished recipes
are skipped, a partial one continues from its checkpoint, and `--time-budget-s` stops cleanly (the
step finishes and is saved), so a study can be chained over several time-limited jobs. `--jobs N`
trains N recipes at once in child processes (log: WORKDIR/<recipe>.log) sharing the accelerator,
so that their compilations overlap; `--take-turns` then trains them one at a time, in recipe order.
When every recipe is done it writes WORKDIR/summary.{json,md}, curves.png and gap_to_bf16.png.

Gap to bf16: (loss_recipe - loss_bf16) / loss_bf16, on the final validation loss and on the
final train loss (mean of the last `TAIL` logged train losses, which damps step-to-step noise).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.config import Config, load_config
from lowbit.plot import plot_runs, read_metrics

STUDY_RECIPES = ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4", "mxfp4-nosr", "mxfp4-norht", "nvfp4-norht",
                 "nvfp4-all-fp4")
TURN_FILE = "turn"  # --take-turns: the recipe whose turn it is on the accelerator
TAIL = 20  # train losses averaged for the "final train loss"


def completed_steps(run_dir: Path) -> int:
    """The last step logged in RUN_DIR/metrics.jsonl (0 when the run has not started)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return 0
    train_rows, _ = read_metrics(run_dir)
    return max((r["step"] for r in train_rows), default=0)


def run_study(config: Config, recipes: Sequence[str], workdir: Path,
              time_budget_s: float | None = None, write: bool = True,
              device_turn: Callable[[], Any] | None = None) -> dict[str, Any] | None:
    """Train the recipes that are not finished yet; the summary once all are (and `write`), else None."""
    from lowbit.train import train  # jax and the model load only when there is work

    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    for recipe in recipes:
        run_dir = workdir / recipe
        if completed_steps(run_dir) >= config.train.steps:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            break
        result = train(config, recipe, run_dir, deadline=deadline, device_turn=device_turn)
        print(json.dumps(result), flush=True)
        if result["stopped"] != "completed":
            break
    if not write or any(completed_steps(workdir / r) < config.train.steps for r in recipes):
        return None
    summary = summarize(workdir, recipes, config)
    write_summary(summary, workdir)
    return summary


def run_jobs(recipes: Sequence[str], workdir: Path, child_args: Sequence[str], jobs: int,
             time_budget_s: float | None = None) -> dict[str, int]:
    """Train each recipe in its own `python -m lowbit.study --recipes R` child, `jobs` at a time.

    Children get XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set) so that several share one GPU's
    memory, and the time left of the budget. Returns each child's exit code. With `--take-turns` in
    child_args they compile together and then train one at a time, in the order of `recipes`:
    WORKDIR/turn names the recipe whose turn it is (a child that exits passes the turn on).
    """
    take_turns = "--take-turns" in child_args
    turn_file, turns = workdir / TURN_FILE, list(recipes)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    workdir.mkdir(parents=True, exist_ok=True)
    turn_file.unlink(missing_ok=True)  # a stale turn from an earlier call must not start anyone
    pending, running, codes = list(recipes), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            recipe = pending.pop(0)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            budget = [] if left is None else ["--time-budget-s", f"{left:.0f}"]
            argv = [sys.executable, "-m", "lowbit.study", "--recipes", recipe, "--no-summary",
                    *budget, *child_args]
            log = open(workdir / f"{recipe}.log", "ab")  # noqa: SIM115 (closed when the child ends)
            running[recipe] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        if take_turns:  # the turn goes to the first recipe, in order, whose child is alive
            turns = [r for r in turns if r in running or r in pending]
            current = next((r for r in turns if r in running), None)
            if current is not None and (not turn_file.is_file() or turn_file.read_text() != current):
                turn_file.write_text(current)
        for recipe, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[recipe] = proc.returncode
                del running[recipe]
                steps = completed_steps(workdir / recipe)
                print(f"{recipe}: exit {proc.returncode}, {steps} steps", flush=True)
        time.sleep(1.0)
    return codes


def final_losses(train_rows: Sequence[dict], val_rows: Sequence[dict],
            last_step: int) -> tuple[float, float | None]:
    """(mean of the last TAIL train losses, last val loss), both over steps <= last_step."""
    losses = [r["loss"] for r in train_rows if r["step"] <= last_step][-TAIL:]
    val = [r["val_loss"] for r in val_rows if r["step"] <= last_step]
    return float(np.nanmean(losses)), (val[-1] if val else None)


@contextlib.contextmanager
def turn_in_order(workdir: Path, recipe: str, poll_s: float = 0.5) -> Iterator[None]:
    """Wait until WORKDIR/turn names `recipe` (run_jobs writes it, in recipe order)."""
    while not ((workdir / TURN_FILE).is_file() and (workdir / TURN_FILE).read_text() == recipe):
        time.sleep(poll_s)
    yield


def summarize(workdir: Path, recipes: Sequence[str], config: Config) -> dict[str, Any]:
    """Per recipe that has metrics: final train/val loss, gap to bf16, tokens seen, non-finite steps.

    A run that stopped before `steps` (complete: false) is compared with bf16 at its own last step
    (gap_step), never its early loss with bf16's final one. Recipes without metrics are left out.
    """
    tokens_per_step = config.data.global_batch_size * config.model.max_target_length
    metrics = {}
    for recipe in recipes:
        if completed_steps(workdir / recipe) > 0:
            metrics[recipe] = read_metrics(workdir / recipe)
    reference = metrics.get("bf16")
    rows = {}
    for recipe, (train_rows, val_rows) in metrics.items():
        steps = train_rows[-1]["step"]
        final_train, final_val = final_losses(train_rows, val_rows, steps)
        row = {"final_train_loss": final_train, "final_val_loss": final_val, "steps": steps,
               "complete": steps >= config.train.steps, "tokens_seen": steps * tokens_per_step,
               "nonfinite_steps": train_rows[-1].get("nonfinite_count", 0),
               "gap_to_bf16_train_loss": None, "gap_to_bf16_val_loss": None, "gap_step": None}
        if reference is not None:
            at = min(steps, reference[0][-1]["step"])
            mine, base = final_losses(train_rows, val_rows, at), final_losses(*reference, at)
            row["gap_step"] = at
            for index, key in enumerate(("gap_to_bf16_train_loss", "gap_to_bf16_val_loss")):
                if mine[index] is not None and base[index]:
                    row[key] = (mine[index] - base[index]) / base[index]
        rows[recipe] = row
    return {"config": config.name, "steps": config.train.steps, "recipes": rows,
            "missing": [r for r in recipes if r not in rows], "settings": config.to_flat()}


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (losses to 4 decimals, gaps in percent)."""
    def number(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"Config `{summary['config']}`, {summary['steps']} steps, same seed and data order.", "",
             "| recipe | steps | final train loss | gap to bf16 | final val loss | gap to bf16 | tokens "
             "| non-finite |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe, row in summary["recipes"].items():
        steps = f"{row['steps']}" if row.get("complete", True) else f"{row['steps']} (stopped early)"
        lines.append(
            f"| {recipe} | {steps} | {number(row['final_train_loss'], '.4f')} | "
            f"{number(row['gap_to_bf16_train_loss'], '+.2%')} | {number(row['final_val_loss'], '.4f')} | "
            f"{number(row['gap_to_bf16_val_loss'], '+.2%')} | {row['tokens_seen']:,} "
            f"| {row['nonfinite_steps']} |")
    if summary.get("missing"):
        lines += ["", f"Not run: {', '.join(summary['missing'])}."]
    lines += ["", "A run that stopped early is compared with bf16 at its own last step."] if any(
        not row.get("complete", True) for row in summary["recipes"].values()) else []
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], workdir: Path) -> None:
    """summary.{json,md}, curves.png (every run) and gap_to_bf16.png (every other run vs bf16)."""
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (workdir / "summary.md").write_text(markdown_table(summary))
    runs = list(summary["recipes"])
    plot_runs([workdir / r for r in runs], workdir / "curves.png")
    others = [workdir / r for r in runs if r != "bf16"]
    if "bf16" in runs and others:
        plot_runs(others, workdir / "gap_to_bf16.png", relative_to=workdir / "bf16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit.study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="config name or YAML path (default: small)")
    parser.add_argument("--steps", type=int, help="steps per recipe (overrides the config)")
    parser.add_argument("--workdir", required=True, help="study directory (one subdirectory per recipe)")
    parser.add_argument("--recipes", default=",".join(STUDY_RECIPES),
                        help=f"comma-separated recipes (default: {','.join(STUDY_RECIPES)})")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop cleanly (save) after this many seconds; call again to continue")
    parser.add_argument("--jobs", type=int, default=1,
                        help="recipes trained at once, each in its own process (default: 1, in this one)")
    parser.add_argument("--take-turns", action="store_true",
                        help="with --jobs: compile concurrently, then train one recipe at a time on the "
                             "accelerator, in the order of --recipes (recipes finish one by one)")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: write the summary and figures for the runs as they are "
                             "(runs that stopped early are compared with bf16 at their last step)")
    # set for --jobs children: train only, the parent summarizes
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if not any(item.startswith("compilation_cache_dir=") for item in overrides):
        overrides.append(f"compilation_cache_dir={(workdir / 'xla_cache').absolute()}")
    try:
        from lowbit.recipes import get_recipe
        config = load_config(args.config, overrides)
        recipes = [get_recipe(name).name for name in args.recipes.split(",") if name]
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as error:
        parser.print_usage(sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.summarize:
        summary = summarize(workdir, recipes, config)
        if not summary["recipes"]:
            print(f"error: no run with metrics in {workdir}", file=sys.stderr)
            return 2
        write_summary(summary, workdir)
        print(markdown_table(summary))
        return 0
    if args.no_summary:  # a --jobs child: train, leave the summary to the parent
        turn = None
        if args.take_turns:
            turn = functools.partial(turn_in_order, workdir, recipes[0])
        run_study(config, recipes, workdir, args.time_budget_s, write=False, device_turn=turn)
        return 0
    if args.jobs > 1:
        child_args = ["--config", args.config, "--workdir", str(workdir),
                      *(["--take-turns"] if args.take_turns else []), *overrides]
        todo = [r for r in recipes if completed_steps(workdir / r) < config.train.steps]
        run_jobs(todo, workdir, child_args, args.jobs, args.time_budget_s)
        args.time_budget_s = 0.0  # the children did the training; only summarize below
    summary = run_study(config, recipes, workdir, args.time_budget_s)
    if summary is None:
        done = {r: completed_steps(workdir / r) for r in recipes}
        print(f"study incomplete (steps done per recipe: {done}); run the same command again to continue")
        return 0
    print(markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
