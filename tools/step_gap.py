"""Where does lowbit.train's step time go that `bench step` does not see? (GPU diagnostic)

Measured on an H200 (2026-11-23): `bench step` small bf16 at batch 32 runs 27 ms/step, the train
loop 120-130 ms/step. Both call the same jitted step (train.build_step). This times the step under
the differences between the two, one at a time (medians over --steps steps, synced per step):

  rand-fixed     random tokens, one fixed batch (what `bench step` times)
  real-fixed     one real batch from make_train_iter, fixed
  real-stream    a new real batch per step (next(iter) + shard_batch), as the train loop
  real-async     as real-stream without a per-step sync (the loop's own timing: wall / steps)
  then --train-steps more real steps, and rand-fixed / real-fixed again on the trained state.

With --trace DIR it also records a jax.profiler trace of a few real-stream steps and prints the
kernels that take the most device time. Usage:
  python tools/step_gap.py --config small --recipe bf16 --steps 20 --train-steps 150 --trace /tmp/tr
--config also takes `bench step`'s configs (moe-1.8b); the trace summary sums GPU kernels by category.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lowbit import train
from lowbit.bench_step import STEP_CONFIGS, load_step_config, step_batch
from lowbit.config import load_config
from lowbit.data import make_train_iter


def timed(run_step, steps: int, sync_each: bool = True) -> float:
    """Median ms/step (sync_each) or mean ms/step over the whole loop (async)."""
    times, t_all = [], time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        out = run_step()
        if sync_each:
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
    jax.block_until_ready(out)
    return 1e3 * (statistics.median(times) if sync_each else (time.perf_counter() - t_all) / steps)


def trace_events(trace_dir: Path) -> dict[str, list[tuple[str, float, int]]]:
    """Per traced process (host threads, GPU streams): (name, total ms, count) by name, longest first."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not files:
        return {}
    events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: str(e.get("args", {}).get("name", e["pid"])) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    total: dict[tuple, float] = collections.defaultdict(float)
    count: dict[tuple, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            key = (names.get(e.get("pid"), str(e.get("pid"))), e.get("name", "?"))
            total[key] += e.get("dur", 0) / 1e3
            count[key] += 1
    out: dict[str, list[tuple[str, float, int]]] = collections.defaultdict(list)
    for (proc, name) in sorted(total, key=total.get, reverse=True):
        out[proc].append((name, total[proc, name], count[proc, name]))
    return dict(out)


# GPU kernel name patterns (checked in order) -> category: what share of a step each kind of work takes.
KERNEL_CATEGORIES = (
    # NCCL's kernels (ncclDevKernel_ReduceScatter_...) before "reduce" and "copy" below claim them
    ("collectives (NCCL)", re.compile(r"nccl|all[_-]?(gather|reduce|to[_-]?all)|reduce[_-]?scatter", re.I)),
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    # splitKreduce / gemv: cuBLAS's own, before "reduce" below claims them
    ("gemm (cuBLAS / XLA Triton GEMM)", re.compile(r"nvjet|xmma|cutlass|gemm|gemv|splitKreduce|cublas|\bdot",
                                                   re.I)),
    ("lowbit Pallas kernels", re.compile(r"^lowbit_|quantize", re.I)),
    ("scatter / sort / gather", re.compile(r"scatter|sort|cub::|gather", re.I)),
    ("transpose / copy", re.compile(r"transpose|copy|memcpy|memset", re.I)),
    ("reduction fusions", re.compile(r"reduce", re.I)),
    ("other XLA fusions", re.compile(r"fusion|loop_|input_", re.I)),
)


def hlo_sources(dump_dir: Path) -> dict[str, str]:
    """Kernel name -> 'fusion kind / opcode, shape | op_name' of the HLO instruction that launched it, read
    from XLA's optimized-HLO dump of the step (XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text). Kernel
    names are instruction names with '.' as '_'; a fusion without op_name takes its fused computation's."""
    files = sorted(dump_dir.glob("*jit_step*after_optimizations.txt"), key=lambda f: f.stat().st_size)
    if not files:
        return {}
    # shape: an array type, or a tuple (cuBLAS / cuDNN custom calls return (result, workspace), multi-output
    # fusions a tuple), which has spaces inside its parentheses
    line_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) (\w[\w-]*)\(")
    comp_re = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
    rows, comp_names, comp = [], collections.defaultdict(list), ""
    for line in files[-1].read_text().splitlines():
        if (c := comp_re.match(line)) and " = " not in line:
            comp = c.group(1)
            continue
        if not (m := line_re.match(line)):
            continue
        name, shape, opcode = m.groups()
        source = re.search(r'op_name="([^"]*)"', line)
        if source:
            comp_names[comp].append(source.group(1))
        kind = re.search(r"kind=(k\w+)|custom_call_target=\"([^\"]+)\"", line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        rows.append((name, shape, (kind.group(1) or kind.group(2)) if kind else opcode,
                     source.group(1) if source else "", calls.group(1) if calls else ""))
    out = {}
    for name, shape, what, where, calls in rows:
        if not where and comp_names.get(calls):
            where = collections.Counter(comp_names[calls]).most_common(1)[0][0]
        out[name.replace(".", "_").replace("-", "_")] = f"{what} {shape[:40]} | {where}"
    return out


def kernel_categories(events: list[tuple[str, float, int]]) -> list[tuple[str, float]]:
    """(category, total ms) over GPU kernel events, largest first; unmatched names go to 'other'."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, ms, _ in events:
        category = next((c for c, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")
        totals[category] += ms
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--recipe", default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--trace", default="")
    p.add_argument("--top", type=int, default=15, help="events listed per traced process")
    p.add_argument("--hlo-dir", default="", help="XLA's --xla_dump_to dir: each top kernel's source")
    p.add_argument("--kernels-tsv", default="", help="write every GPU kernel (ms/step, count, source) here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    config = (load_step_config(args.config, args.overrides) if args.config in STEP_CONFIGS
              else load_config(args.config, args.overrides))
    parts = train.build_step(config, args.recipe)
    mesh, step_fn, schedule, zero = parts.mesh, parts.train_step, parts.schedule, jnp.float32(0.0)

    b, t = config.data.global_batch_size, config.model.max_target_length
    rand_batch = step_batch(config, mesh, "random")  # what `bench step` times
    data = make_train_iter(config.data)
    real_batch = train.shard_batch(next(data), mesh)
    holder = {"state": parts.state}

    def step_on(batch_fn):
        def run():
            holder["state"], metrics = step_fn(holder["state"], batch_fn(), schedule, zero)
            return metrics
        return run

    fixed_rand, fixed_real = step_on(lambda: rand_batch), step_on(lambda: real_batch)
    stream = step_on(lambda: train.shard_batch(next(data), mesh))
    timed(fixed_rand, 3)  # compile + warm-up
    rows = [("rand-fixed", timed(fixed_rand, args.steps)), ("real-fixed", timed(fixed_real, args.steps)),
            ("real-stream", timed(stream, args.steps)),
            ("real-async", timed(stream, args.steps, sync_each=False))]
    if args.train_steps > 0:
        t0 = time.perf_counter()
        timed(stream, args.train_steps, sync_each=False)
        train_ms = 1e3 * (time.perf_counter() - t0) / args.train_steps
        rows.append((f"(train {args.train_steps} steps, async)", train_ms))
    rows += [("rand-fixed, trained", timed(fixed_rand, args.steps)),
             ("real-fixed, trained", timed(fixed_real, args.steps)),
             ("real-stream, trained", timed(stream, args.steps))]
    device = jax.devices()[0].device_kind
    print(f"\n{args.config} {args.recipe} batch {b} x {t} on {device}, jax {jax.__version__}")
    print(f"{'variant':34s} {'ms/step':>9s}")
    for name, ms in rows:
        print(f"{name:34s} {ms:9.2f}")

    if args.trace:
        trace_dir = Path(args.trace)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            timed(stream, 5)
        print(f"\ntop traced events over 5 real-stream steps (trained state), {trace_dir}")
        processes = trace_events(trace_dir)  # one read of the (large) trace file
        for proc, events in processes.items():
            listed = events[:max(args.top, 0)]
            print(f"-- {proc} (listed events: {sum(ms for _, ms, _ in listed) / 5:.2f} ms/step)")
            for name, ms, n in listed:
                print(f"{ms / 5:9.2f} ms/step  x{n / 5:<6.1f} {name[:100]}")
        sources = hlo_sources(Path(args.hlo_dir)) if args.hlo_dir else {}
        tsv_rows = ["device\tms_per_step\tcount_per_step\tkernel\tsource\n"]  # every GPU, not the last one
        for proc, events in processes.items():
            if "GPU" not in proc:
                continue
            if sources:
                print(f"-- {proc}: top kernels' HLO source")
                for name, ms, n in events[:max(args.top, 0)]:
                    print(f"{ms / 5:9.2f} x{n / 5:<5.1f} {name[:28]:28s} {sources.get(name, '?')[-150:]}")
            tsv_rows += [f"{proc}\t{ms / 5:.4f}\t{n / 5:.1f}\t{name}\t{sources.get(name, '')}\n"
                         for name, ms, n in events]
            print(f"-- {proc}: every kernel by category (ms/step)")
            for category, ms in kernel_categories(events):
                print(f"{ms / 5:9.2f}  {category}")
        if args.kernels_tsv:
            Path(args.kernels_tsv).write_text("".join(tsv_rows))


if __name__ == "__main__":
    main()
