"""Benchmarks: `python -m lowbit.bench {quantize,hadamard,gemm,grouped,step} [--size tiny|small|full]`.

quantize: every format's quantize and quantize+dequantize of a bf16 tensor, as achieved GB/s
  (bytes = input read + outputs written) and as a fraction of a copy measured in the same run.
hadamard: the block Walsh-Hadamard's butterfly ("fwht") vs dense per-block GEMM ("matmul"),
  blocks 16..256, as GB/s and fraction of copy: the data behind hadamard's method="auto".
gemm, grouped, step: live in their own modules (EXTENSIONS: lowbit/bench_gemm.py, lowbit/bench_step.py),
  each with `SUBCOMMANDS = {name: add_parser(subparsers)}` (the parser's defaults carry what to run)
  and `run_and_report(args) -> int`; until such a module exists the subcommand says so.

Timing (`time_fn`): jit, compile timed separately, warm-up, then the median of N calls that rotate
over several input sets (so caches do not flatter), each ended by block_until_ready. The helpers
(`time_fn`, `print_table`, `write_json`, `environment_info`, `nbytes`) are public for other benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIZES = {"tiny": (32, 256), "small": (1024, 512), "full": (16384, 4096)}  # bf16 [rows, cols]
INPUT_SETS = {"tiny": 2, "small": 3, "full": 3}
# (label, format name, quantize keyword arguments)
QUANTIZE_CASES = (
    ("MXFP8 floor", "mxfp8", {"scale_mode": "floor"}),
    ("MXFP8 rceil", "mxfp8", {"scale_mode": "rceil"}),
    ("MXFP8_E5M2", "mxfp8_e5m2", {}),
    ("MXFP6_E2M3", "mxfp6_e2m3", {}),
    ("MXFP4", "mxfp4", {}),
    ("NVFP4 1x16", "nvfp4", {}),
    ("NVFP4 16x16", "nvfp4", {"axis": (-2, -1)}),
    ("FP8 per-tensor", "fp8", {}),
)
HADAMARD_BLOCKS = (16, 32, 64, 128, 256)
HADAMARD_METHODS = ("fwht", "matmul")
# Subcommands implemented in other modules: name -> module with SUBCOMMANDS and run_and_report.
EXTENSIONS = {
    "gemm": "lowbit.bench_gemm",
    "grouped": "lowbit.bench_gemm",
    "step": "lowbit.bench_step",
    "roofline": "lowbit.bench_step",
}


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock of one benchmarked function: median over `times_ms`, compile time apart."""

    median_ms: float
    compile_ms: float
    times_ms: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "compile_ms": self.compile_ms, "times_ms": list(self.times_ms)}


def time_fn(fn: Callable, arg_sets: Sequence[Sequence[Any]], *, repeats: int = 10, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter, jit: bool = True) -> Timing:
    """Median wall-clock (ms) of fn(*arg_sets[i % len(arg_sets)]) over `repeats` calls.

    With jit=True, fn is jitted and compiled first (timed as compile_ms, excluded from the median);
    `warmup` untimed calls follow. Every call waits for its result (jax.block_until_ready).
    """
    if not arg_sets:
        raise ValueError("time_fn needs at least one input set")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_fn needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    compile_ms = 0.0
    if jit:
        start = clock()
        fn = jax.jit(fn).lower(*arg_sets[0]).compile()
        compile_ms = (clock() - start) * 1e3
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times_ms = []
    for i in range(repeats):
        args = arg_sets[i % len(arg_sets)]
        start = clock()
        jax.block_until_ready(fn(*args))
        times_ms.append((clock() - start) * 1e3)
    return Timing(statistics.median(times_ms), compile_ms, tuple(times_ms))


def nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def gb_per_s(n_bytes: int, ms: float) -> float:
    return n_bytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- reporting
def environment_info() -> dict[str, Any]:
    """Device, versions, date and machine load (for the table header and the JSON)."""
    import jaxlib

    device = jax.devices()[0]
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):  # a busy host makes CPU timings noisy: record it
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def header_lines(title: str, env: dict[str, Any]) -> list[str]:
    load = f", load {env['load_avg_1m']}" if "load_avg_1m" in env else ""
    device = f"{env['platform']} {env['device_kind']} x{env['device_count']} ({env['cpu_count']} CPUs{load})"
    versions = f"jax {env['jax']}, jaxlib {env['jaxlib']}, python {env['python']}"
    return [title, f"device: {device} | {versions} | {env['date']}"]


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]],
                header: Sequence[str] = (), file: Any = None) -> str:
    """Print rows as a plain aligned text table and return the text.

    columns: (row key, column title, format spec such as ".3f" or "" for str()); numbers are
    right-aligned, text left-aligned; missing values print as "-".
    """
    cells = [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(title)] + [len(r[i]) for r in cells]) for i, (_, title, _) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for key, _, _ in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric,
                                                                                 strict=True)).rstrip()

    lines = [*header, line([title for _, title, _ in columns]), line(["-" * w for w in widths])]
    lines += [line(r) for r in cells]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write payload as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


# ----------------------------------------------------------------------------- shared pieces
def bf16_inputs(shape: tuple[int, int], count: int, seed: int = 0) -> list[tuple[jax.Array]]:
    """`count` independent standard-normal bf16 tensors (one argument tuple each)."""
    keys = jax.random.split(jax.random.key(seed), count)
    return [(jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16).block_until_ready(),)
            for k in keys]


def copy_fn(x: jax.Array) -> jax.Array:
    """Bandwidth baseline: reads and writes every byte once (negation cannot be elided, unlike x * 1)."""
    return -x


def measure_copy(arg_sets: Sequence[Sequence[Any]], repeats: int) -> dict[str, Any]:
    timing = time_fn(copy_fn, arg_sets, repeats=repeats)
    n_bytes = nbytes(arg_sets[0]) * 2
    return {"name": "copy (-x)", "bytes": n_bytes, "gb_s": gb_per_s(n_bytes, timing.median_ms),
            **timing.as_dict()}


def _bandwidth_row(fn: Callable, arg_sets: Sequence[Sequence[Any]], repeats: int,
                   copy: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """Time fn; bytes = inputs read + outputs written (output shapes from jax.eval_shape)."""
    timing = time_fn(fn, arg_sets, repeats=repeats)
    n_bytes = nbytes(arg_sets[0]) + nbytes(jax.eval_shape(fn, *arg_sets[0]))
    gbs = gb_per_s(n_bytes, timing.median_ms)
    return {**labels, "bytes": n_bytes, "gb_s": gbs, "frac_copy": gbs / copy["gb_s"],
            "x_copy_time": timing.median_ms / copy["median_ms"], **timing.as_dict()}


def _payload(name: str, args: argparse.Namespace, shape: tuple[int, ...], env: dict[str, Any],
             copy: dict[str, Any], rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"benchmark": name, "size": args.size, "shape": list(shape), "dtype": "bfloat16",
            "repeats": args.repeats, "input_sets": INPUT_SETS[args.size], "environment": env,
            "baseline": copy, "rows": rows, **extra}


# ----------------------------------------------------------------------------- quantize
QUANTIZE_COLUMNS = (("format", "format", ""), ("op", "op", ""), ("median_ms", "median ms", ".3f"),
                    ("compile_ms", "compile ms", ".0f"), ("bytes", "bytes", ",d"), ("gb_s", "GB/s", ".2f"),
                    ("frac_copy", "of copy BW", ".2f"))


def bench_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """quantize and qdq of a bf16 tensor per format: achieved GB/s and fraction of copy bandwidth."""
    import lowbit

    shape = SIZES[args.size]
    env = environment_info()
    arg_sets = bf16_inputs(shape, INPUT_SETS[args.size])
    copy = measure_copy(arg_sets, args.repeats)
    rows = []
    for label, fmt_name, kwargs in QUANTIZE_CASES:
        fmt = lowbit.get_format(fmt_name)
        quantize_only = lambda x, fmt=fmt, kwargs=kwargs: lowbit.quantize(x, fmt, **kwargs)
        quantize_dequantize = lambda x, fmt=fmt, kwargs=kwargs: lowbit.qdq(x, fmt, **kwargs)
        for op, fn in (("quantize", quantize_only), ("qdq", quantize_dequantize)):
            rows.append(_bandwidth_row(fn, arg_sets, args.repeats, copy, format=label, op=op))
    title = (f"lowbit bench quantize: bf16 {shape[0]}x{shape[1]} ({args.size}), median of {args.repeats} "
             f"over {INPUT_SETS[args.size]} input sets; copy {copy['median_ms']:.3f} ms = "
             f"{copy['gb_s']:.2f} GB/s; bytes = input + outputs (data, scales; qdq: bf16 output)")
    print_table(rows, QUANTIZE_COLUMNS, header_lines(title, env))
    return _payload("quantize", args, shape, env, copy, rows)


# ----------------------------------------------------------------------------- hadamard
HADAMARD_COLUMNS = (("block", "block", "d"), ("method", "method", ""), ("median_ms", "median ms", ".3f"),
                    ("compile_ms", "compile ms", ".0f"), ("gb_s", "GB/s", ".2f"),
                    ("frac_copy", "of copy BW", ".2f"), ("speedup_vs_fwht", "vs fwht", ".2f"))


def bench_hadamard(args: argparse.Namespace) -> dict[str, Any]:
    """hadamard(x, axis=-1, block=b) by butterfly vs dense GEMM on bf16: GB/s, fraction of copy, winner."""
    from lowbit.hadamard import hadamard

    shape = SIZES[args.size]
    env = environment_info()
    arg_sets = bf16_inputs(shape, INPUT_SETS[args.size])
    copy = measure_copy(arg_sets, args.repeats)
    rows, winners = [], {}
    for block in HADAMARD_BLOCKS:
        by_method = {}
        for method in HADAMARD_METHODS:
            fn = lambda x, block=block, method=method: hadamard(x, axis=-1, block=block, method=method)
            by_method[method] = _bandwidth_row(fn, arg_sets, args.repeats, copy, block=block, method=method)
        for row in by_method.values():
            row["speedup_vs_fwht"] = by_method["fwht"]["median_ms"] / row["median_ms"]
            rows.append(row)
        winners[str(block)] = min(by_method, key=lambda m: by_method[m]["median_ms"])
    title = (f"lowbit bench hadamard: bf16 {shape[0]}x{shape[1]} ({args.size}), blocks along the last axis, "
             f"median of {args.repeats} over {INPUT_SETS[args.size]} input sets; copy "
             f"{copy['median_ms']:.3f} ms = {copy['gb_s']:.2f} GB/s")
    print_table(rows, HADAMARD_COLUMNS, header_lines(title, env))
    print("faster method per block: " + ", ".join(f"{b}: {m}" for b, m in winners.items()))
    return _payload("hadamard", args, shape, env, copy, rows, winner=winners)


# ----------------------------------------------------------------------------- CLI
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=tuple(SIZES), default="small",
                        help="tensor size: " + ", ".join(f"{k} {r}x{c}" for k, (r, c) in SIZES.items()))
    parser.add_argument("--json", default=None, help="output JSON path (default ./bench_<subcommand>.json)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")


def _add_local(subparsers: Any, name: str, fn: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    parser = subparsers.add_parser(name, help=fn.__doc__.split("\n")[0])
    add_common_args(parser)
    parser.set_defaults(run=lambda args: _run_local(fn, args))


def _run_local(fn: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    payload = fn(args)
    path = write_json(args.json or f"bench_{args.command}.json", payload)
    print(f"JSON: {path}")
    return 0


def _add_extension(subparsers: Any, name: str, module_name: str) -> None:
    """Register `name` from its module, or a placeholder that explains what is missing."""
    try:
        module = importlib.import_module(module_name)
        add_parser = module.SUBCOMMANDS[name]
        run_and_report = module.run_and_report
    except Exception as error:  # missing or broken extension: only its own subcommand fails
        reason = (f"{module_name} does not exist yet" if isinstance(error, ModuleNotFoundError)
                  and error.name == module_name else f"{module_name} failed to load: {error!r}")

        def placeholder(args: argparse.Namespace) -> int:
            raise NotImplementedError(f"`python -m lowbit.bench {name}` is filled in by the dot/model work "
                                      f"({reason}; it needs SUBCOMMANDS[{name!r}] and run_and_report)")

        parser = subparsers.add_parser(name, help=f"(not available: {reason})")
        add_common_args(parser)
        parser.set_defaults(run=placeholder)
        return
    add_parser(subparsers)
    subparsers.choices[name].set_defaults(run=run_and_report)


SUBCOMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "quantize": bench_quantize,
    "hadamard": bench_hadamard,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowbit.bench", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(
        [*SUBCOMMANDS, *EXTENSIONS]) + "}")
    for name, fn in SUBCOMMANDS.items():
        _add_local(subparsers, name, fn)
    for name, module_name in EXTENSIONS.items():
        _add_extension(subparsers, name, module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except NotImplementedError as error:
        parser.exit(2, f"{parser.prog} {args.command}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
