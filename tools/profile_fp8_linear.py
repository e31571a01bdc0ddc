"""Where the fp8 linear layer's fwd+bwd goes, kernel by kernel: XLA quantize vs the cast kernel.

Run on the GPU machine:  python tools/profile_fp8_linear.py [--shape 16384x4096x14336] [--calls 10]
For each quantize switch (xla, auto) and each weight layout (w [N, K] as `lowbit.bench gemm` stores
it, w [K, N] as a Flax Dense kernel stores it) it times lowbit.dot_general("fp8", backend "fp8")
fwd+bwd (median of loops of back-to-back calls), then traces `--calls` calls with jax.profiler and
prints every GPU kernel's ms per call (tools/step_gap.py's trace reader), grouped by category.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_gap import kernel_categories, trace_events  # noqa: E402

import lowbit  # noqa: E402
from lowbit.kernels import quantize_impl  # noqa: E402

BF16 = jnp.bfloat16


def build(layout: str, impl: str, m: int, k: int, n: int):
    dims = (((1,), (1,)), ((), ())) if layout == "nk" else (((1,), (0,)), ((), ()))
    dot = lowbit.dot_general("fp8", backend="fp8")

    def step(x, w, dy):
        y, pullback = jax.vjp(lambda a, b: dot(a, b, dims, preferred_element_type=BF16), x, w)
        return (y, *pullback(dy))

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), BF16)
    w = (jax.random.normal(keys[1], (n, k) if layout == "nk" else (k, n), jnp.float32) / 64).astype(BF16)
    dy = jax.random.normal(keys[2], (m, n), BF16)
    with quantize_impl(impl):
        compiled = jax.jit(step).lower(x, w, dy).compile()
    return compiled, (x, w, dy)


def loop_ms(fn, args, calls: int, loops: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="16384x4096x14336", help="MxKxN")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    m, k, n = (int(v) for v in args.shape.split("x"))
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  fp8 fwd+bwd {m}x{k}x{n}",
          flush=True)
    for layout in ("nk", "kn"):
        for impl in ("xla", "auto"):
            compiled, operands = build(layout, impl, m, k, n)
            ms = loop_ms(compiled, operands, args.calls)
            with tempfile.TemporaryDirectory() as tmp:
                jax.profiler.start_trace(tmp)
                jax.block_until_ready([compiled(*operands) for _ in range(args.calls)])
                jax.profiler.stop_trace()
                processes = trace_events(Path(tmp))
            label = f"w [{layout[0].upper()}, {layout[1].upper()}], quantize {impl}"
            print(f"\n== {label}: {ms:.3f} ms/call", flush=True)
            for proc, events in processes.items():
                if "GPU" not in proc:
                    continue
                gpu_ms = sum(t for _, t, _ in events) / args.calls
                print(f"-- {proc}: {gpu_ms:.3f} ms/call of kernels")
                for name, t, count in events[:args.top]:
                    print(f"{t / args.calls:8.3f} ms  x{count / args.calls:<4.1f} {name[:100]}")
                for category, t in kernel_categories(events):
                    print(f"{t / args.calls:8.3f} ms  [{category}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
