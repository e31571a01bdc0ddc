"""The fp8 recipe's quantize passes in the GEMMs: where they sit and what they cost (GPU study, issue 5).

Variants, each measured in its own process (jit caches would otherwise keep the first variant's traces):
  before       the sixth session's dot: every operand materialised by an optimization barrier before it
               is quantized, and fprop's W quantized from a bf16 transpose Wᵀ
  w-in-place   W quantized as stored, its FP8 bytes transposed (lowbit.dot._weight_in_place); barriers kept
  new          the library now: w-in-place, and no barrier on contiguous per-tensor operands (x, W, dY), so
               XLA may fuse a producer into their amax and cast (lowbit.dot._needs_barrier)
Rows: the fp8 recipe's linear fwd+bwd at 16384x4096x14336 (vs bf16 and vs its 3 FP8 GEMMs on
pre-quantized operands), alone and after a SwiGLU producer; optionally `bench step`'s timing of a config.
The seventh session's first study (an IEEE-convert cast, and no barrier at all) is in git at fa12517.

  python tools/fp8_cast_study.py --variants before,w-in-place,new --step-config moe-1.8b --step-bf16
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

TN = (((1,), (1,)), ((), ()))  # x [M, K] · w [N, K]: both contract their last dim
VARIANTS = ("before", "w-in-place", "new")


def apply_variant(name: str) -> None:
    import lowbit.dot
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
    if name in ("before", "w-in-place"):
        lowbit.dot._needs_barrier = lambda cfg, contiguous: True
    if name == "before":
        lowbit.dot._weight_in_place = lambda pc: False


def emit(row: dict) -> None:
    """One result line for the parent (which keeps every line printed before a failure)."""
    print("ROW " + json.dumps(row), flush=True)


def run_variant(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    import lowbit
    from lowbit.bench_gemm import fp8_gemm_operands, fp8_gemms_only, fwd_bwd_fn, measure
    apply_variant(args.variant)
    bf16 = jnp.bfloat16
    base = {"variant": args.variant}

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
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # micro | step:<recipe>
    p.add_argument("--variant", default="new", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "micro":
        run_variant(args)
        return 0
    if args.child.startswith("step:"):
        run_step(args, args.child.split(":", 1)[1])
        return 0

    rows: list[dict] = []

    def child(what: str, variant: str = "new") -> None:
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
