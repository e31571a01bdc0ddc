"""How the per-tensor FP8 cast is emitted, and what that does to the fp8 recipe (GPU study, issue 5).

Variants, each run in its own process (jit caches would otherwise keep the first variant's traces):
  grid+barrier     the fifth/sixth-session path: round_to_grid's exponent arithmetic, then the cast,
                   on an operand materialised by an optimization barrier
  convert+barrier  the cast alone rounds (IEEE RNE convert, saturation by the clip), barrier kept
  convert          the library default since the seventh session: no barrier for per-tensor formats,
                   so XLA may fuse the operand's producer and a transpose into the amax and the cast
Rows: FP8 quantize of bf16 16384x4096 (back-to-back loop, vs a copy); the fp8 recipe's linear
fwd+bwd at 16384x4096x14336 (vs bf16 and vs its 3 FP8 GEMMs on pre-quantized operands), alone and
after a SwiGLU producer; optionally `bench step`'s timing of a config. First, a parity check: the
device's f32 -> E4M3/E5M2 convert against ml_dtypes on every midpoint and its f32 neighbours, and
lowbit.quantize on the device against the CPU backend, bit for bit.

  python tools/fp8_cast_study.py --variants grid+barrier,convert+barrier,convert --step-config moe-1.8b
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

TN = (((1,), (1,)), ((), ()))  # x [M, K] · w [N, K]: both contract their last dim
VARIANTS = ("grid+barrier", "convert+barrier", "convert")


def apply_variant(name: str) -> None:
    import lowbit.dot
    import lowbit.quantize
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
    if name.startswith("grid"):
        lowbit.quantize._CONVERT_ROUNDS = ()  # every format goes through round_to_grid again
    if name.endswith("+barrier"):
        lowbit.dot._needs_barrier = lambda cfg: True


def parity() -> dict:
    """Mismatching bytes: device convert vs ml_dtypes, and lowbit.quantize on the device vs the CPU."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    import lowbit
    out, rng = {}, np.random.default_rng(0)
    for dt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        grid = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
        grid = np.unique(grid[np.isfinite(grid)])
        mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
        up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))
        wide = rng.standard_normal(1 << 20) * np.exp2(rng.integers(-24, 10, 1 << 20))
        top = float(ml_dtypes.finfo(dt).max)
        y = np.clip(np.concatenate([grid, mids, up, down, wide]), -top, top).astype(np.float32)
        got = np.asarray(jax.jit(lambda a, dt=dt: a.astype(dt))(y)).view(np.uint8)
        out[f"convert {dt.__name__}"] = int((got != y.astype(dt).view(np.uint8)).sum())
    cpu = jax.devices("cpu")[0]
    x = rng.standard_normal((512, 1024)) * np.exp2(rng.integers(-30, 30, (512, 1)))
    x = x.astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-40, 448.0]
    for fmt in ("fp8", "fp8_e5m2", "mxfp8", "mxfp8_e5m2"):
        for dtype in (jnp.float32, jnp.bfloat16):
            q_dev = lowbit.quantize(jnp.asarray(x, dtype), fmt)
            q_cpu = lowbit.quantize(jax.device_put(jnp.asarray(x, dtype), cpu), fmt)
            bad = int((np.asarray(q_dev.data).view(np.uint8) != np.asarray(q_cpu.data).view(np.uint8)).sum())
            out[f"quantize {fmt} {jnp.dtype(dtype).name}"] = bad
    return out


def emit(row: dict) -> None:
    """One result line for the parent (which keeps every line printed before a failure)."""
    print("ROW " + json.dumps(row), flush=True)


def run_variant(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    import lowbit
    from lowbit.bench_gemm import fp8_gemm_operands, fp8_gemms_only, fwd_bwd_fn, measure, time_calls
    apply_variant(args.variant)
    bf16 = jnp.bfloat16
    base = {"variant": args.variant}

    rows_q, cols_q = (16384, 4096) if args.size == "full" else (256, 512)
    x = jax.random.normal(jax.random.key(0), (rows_q, cols_q), bf16)
    copy = time_calls(jax.jit(lambda a: a * 1).lower(x).compile(), [(x,)], args.iters)["ms"]
    quantize = jax.jit(lambda a: lowbit.quantize(a, "fp8")).lower(x).compile()
    quant = time_calls(quantize, [(x,)], args.iters)["ms"]
    emit({**base, "row": f"quantize fp8 {rows_q}x{cols_q} bf16", "ms": quant, "copy_ms": copy,
                 "of_copy": (copy * 1.5) / quant})  # bytes: read 2 B, write 1 B per element; copy 2 + 2

    m, k, n = (16384, 4096, 14336) if args.size == "full" else (256, 128, 192)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (m, k), bf16)
    w = (jax.random.normal(keys[1], (n, k), bf16) / math.sqrt(k)).astype(bf16)
    dy = jax.random.normal(keys[2], (m, n), bf16)
    flops = 6.0 * m * k * n
    step_args = [(x, w, dy, keys[3])]
    timed = {}
    for recipe in ("bf16", "fp8"):
        fn = fwd_bwd_fn(recipe, "-" if recipe == "bf16" else "fp8")
        timed[recipe] = measure(fn, step_args, flops, args.iters)
    floor = measure(fp8_gemms_only, [fp8_gemm_operands(x, w, dy)], flops, args.iters)
    bf16_ms, fp8_ms = timed["bf16"]["ms"], timed["fp8"]["ms"]
    emit({**base, "row": f"linear fwd+bwd {m}x{k}x{n}", "bf16_ms": bf16_ms, "ms": fp8_ms,
                 "floor_ms": floor["ms"], "vs_bf16": bf16_ms / fp8_ms,
                 "quant_share": (fp8_ms - floor["ms"]) / floor["ms"]})

    # The same linear after a producer: y = swiglu(a, b) · Wᵀ, as the MLP's second GEMM sees its input.
    a = jax.random.normal(keys[0], (m, k), bf16)
    b = jax.random.normal(keys[2], (m, k), bf16)
    for recipe in ("bf16", "fp8"):
        dot = lowbit.dot_general(recipe, backend=None if recipe == "bf16" else "fp8")

        def f(a, b, w, dy, dot=dot):
            h = jax.nn.silu(a) * b
            y, pull = jax.vjp(lambda h, w: dot(h, w, TN, preferred_element_type=bf16), h, w)
            return (y, *pull(dy))
        timed[recipe] = measure(f, [(a, b, w, dy)], flops, args.iters)
    bf16_ms, fp8_ms = timed["bf16"]["ms"], timed["fp8"]["ms"]
    emit({**base, "row": "swiglu -> linear fwd+bwd", "bf16_ms": bf16_ms, "ms": fp8_ms,
                 "vs_bf16": bf16_ms / fp8_ms})


def run_step(args: argparse.Namespace, recipe: str) -> None:
    from lowbit.bench_step import measure_step
    apply_variant(args.variant)
    r = measure_step(args.step_config, recipe, args.step_steps)
    emit({"variant": args.variant, "row": f"step {args.step_config} {recipe}", "ms": r["ms"],
          "compile_s": r["compile_s"], "peak_gb": r.get("peak_gb")})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a CPU smoke run")
    p.add_argument("--step-config", default="")
    p.add_argument("--step-steps", type=int, default=8)
    p.add_argument("--step-variants", default="", help="variants whose step is timed (default: --variants)")
    p.add_argument("--step-bf16", action="store_true", help="also time the bf16 step (once, first variant)")
    p.add_argument("--json", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # parity | micro | step:<recipe>
    p.add_argument("--variant", default="convert", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "parity":
        for k, v in parity().items():
            emit({"variant": "-", "row": f"parity: {k}", "mismatches": v})
        return 0
    if args.child == "micro":
        run_variant(args)
        return 0
    if args.child.startswith("step:"):
        run_step(args, args.child.split(":", 1)[1])
        return 0

    rows: list[dict] = []

    def child(what: str, variant: str = "convert") -> None:
        """Every measurement in a fresh process: no jit cache or GPU memory carried between them."""
        cmd = [sys.executable, __file__, "--child", what, "--variant", variant, "--iters", str(args.iters),
               "--size", args.size, "--step-config", args.step_config, "--step-steps", str(args.step_steps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        new = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            new.append({"variant": variant, "row": f"{what} failed", "error": done.stderr[-1500:]})
        rows.extend(new)
        for r in new:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    child("parity")
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        child("micro", variant)
    if args.step_config:
        if args.step_bf16:
            child("step:bf16")
        for variant in [v for v in args.step_variants.split(",") if v] or variants:
            child("step:fp8", variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
