"""Tile sweep of the Pallas grouped GEMM's three kernels, each timed alone (GPU diagnostic).

The MoE layer's fwd+bwd runs three grouped GEMMs: fprop Y = X·W[g] (grouped_matmul, rhs [E, K, N]),
dgrad dX = dY·W[g]ᵀ (grouped_matmul with rhs_layout="enk": W [E, K, N] read as [E, N_out, K_in]) and
wgrad dW[e] = X_eᵀ·dY_e (grouped_wgrad). Each may want its own tile; this times every candidate tile
per kernel against a dense GEMM with the same useful FLOPs, Zipf routing as `bench grouped`.
--fp8-imprecise-acc none,128,1073741824 times the FP8 kernels at each Triton maxNumImpreciseAcc in one process
(lowbit.kernels.triton_fp8_acc: N <= bk promotes the FP8 partial sums to f32 every N K elements, N > bk never;
none = jax's default, every WGMMA).
Accuracy per setting: tools/fp8acc_accuracy.py (a float64 reference on the host; an f32 HIGHEST reference
on the GPU here made two runs time out before printing).
Usage: python tools/grouped_tiles.py --configs e8k2,e64k8 --json /tmp/tiles.json
       python tools/grouped_tiles.py --kernels fp8-fprop --fp8-imprecise-acc none,128
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.bench_gemm import GROUPED_CONFIGS, GROUPED_TOKENS, measure, per_tensor_fp8, zipf_group_sizes
from lowbit.kernels import triton_fp8_acc
from lowbit.kernels.grouped_pallas import grouped_matmul, grouped_wgrad

BF16 = jnp.bfloat16
TN = (((1,), (1,)), ((), ()))
# bm:bk:bn:warps:stages. Shared memory per stage is (bm*bk + bk*bn) elements (wgrad: bm*(bk + bn)).
TILES = {
    "bf16": ["128:64:128:4:3", "128:64:256:8:3", "128:64:128:8:4", "256:64:128:8:3", "128:32:256:8:4",
             "64:64:256:4:4", "128:128:128:8:3", "64:128:128:4:3"],
    "wgrad": ["64:128:128:4:3", "64:128:256:8:3", "64:256:128:8:3", "32:128:128:4:4", "64:128:128:8:4",
              "128:128:128:8:2", "32:256:128:4:3", "64:64:128:4:4"],
    "fp8": ["128:128:128:8:3", "128:128:256:8:3", "128:64:256:8:4", "64:128:256:4:4", "256:128:128:8:3",
            "128:256:128:8:3", "128:128:256:8:4", "256:128:256:8:3", "256:128:128:8:4", "128:128:128:4:4",
            "128:256:256:8:2"],
}


def parse(tile: str) -> tuple[tuple[int, int, int], int, int]:
    bm, bk, bn, warps, stages = (int(f) for f in tile.split(":"))
    return (bm, bk, bn), warps, stages


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="e8k2,e64k8")
    p.add_argument("--kernels", default="fprop,dgrad,wgrad,fp8-fprop")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiles", default="", help="bm:bk:bn:warps:stages,... instead of the built-in lists")
    p.add_argument("--json", default="/tmp/grouped_tiles.json")
    p.add_argument("--fp8-imprecise-acc", default="", metavar="N,...",
                   help="Triton maxNumImpreciseAcc values for the FP8 dots, each timed (none: jax's default; "
                        "128: promote every 128 K; 1073741824: never)")
    args = p.parse_args()
    # the flag's values, else the one from $LOWBIT_FP8_MAX_IMPRECISE_ACC (None: jax's default)
    try:
        flag = args.fp8_imprecise_acc
        fp8_accs = ([triton_fp8_acc.parse_setting(v, "--fp8-imprecise-acc") for v in flag.split(",")]
                    if flag else [triton_fp8_acc.get_fp8_max_imprecise_acc()])
    except (TypeError, ValueError) as error:
        p.error(str(error))
    unpatched = []  # settings != None under which no FP8 tt.dot was given the attribute
    rows = []
    tokens = GROUPED_TOKENS["full"]
    for config in args.configs.split(","):
        experts, top_k, k, n = GROUPED_CONFIGS["full"][config]
        m = tokens * top_k
        sizes = jnp.asarray(zipf_group_sizes(tokens, experts, top_k, 0.5, 0))
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (m, k), BF16)
        w = (jax.random.normal(keys[1], (experts, k, n), BF16) / math.sqrt(k)).astype(BF16)
        dy = jax.random.normal(keys[2], (m, n), BF16)
        flops = 2.0 * m * k * n
        dense = {
            "fprop": (lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=BF16), (x, w[0].T)),
            "dgrad": (lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=BF16), (dy, w[0])),
            "wgrad": (lambda a, b: lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                   preferred_element_type=BF16), (x, dy)),
        }
        x8, w8 = per_tensor_fp8(x)[0], per_tensor_fp8(jnp.swapaxes(w, 1, 2))[0]
        dense["fp8-fprop"] = (lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=BF16),
                              (x8, w8[0]))
        for kernel in args.kernels.split(","):
            fn, dense_args = dense[kernel]
            base = measure(fn, [dense_args], flops, args.iters)
            print(f"{config} {kernel:9s} dense {base['ms']:8.3f} ms {base['tflops']:7.1f} TF/s", flush=True)
            family = "fp8" if kernel.startswith("fp8") else "wgrad" if kernel == "wgrad" else "bf16"
            accs = fp8_accs if kernel.startswith("fp8") else [None]
            for tile, fp8_acc in ((t, a) for t in (args.tiles.split(",") if args.tiles else TILES[family])
                                  for a in accs):
                if kernel.startswith("fp8"):
                    triton_fp8_acc.set_fp8_max_imprecise_acc(fp8_acc)  # clears jax's caches when it changes
                patched_before = triton_fp8_acc.patched_dot_count()
                t, warps, stages = parse(tile)
                opts = dict(tile=t, num_warps=warps, num_stages=stages, preferred_element_type=BF16)
                enk = dict(opts, rhs_layout="enk")
                if kernel == "fprop":
                    f, a = (lambda a, b, s, o=opts: grouped_matmul(a, b, s, **o)), (x, w, sizes)
                elif kernel == "dgrad":
                    f, a = (lambda a, b, s, o=enk: grouped_matmul(a, b, s, **o)), (dy, w, sizes)
                elif kernel == "wgrad":
                    f, a = (lambda a, b, s, o=opts: grouped_wgrad(a, b, s, **o)), (x, dy, sizes)
                else:
                    f, a = (lambda a, b, s, o=enk: grouped_matmul(a, b, s, **o)), (x8, w8, sizes)
                row = {"config": config, "kernel": kernel, "tile": tile, "dense_ms": base["ms"],
                       "fp8_max_imprecise_acc": fp8_acc}
                try:
                    r = measure(f, [a], flops, args.iters)
                    row.update(ms=r["ms"], tflops=r["tflops"], ratio=base["ms"] / r["ms"])
                    print(f"{config} {kernel:9s} {tile:16s} acc {fp8_acc} {r['ms']:8.3f} ms "
                          f"{r['tflops']:7.1f} TF/s {row['ratio']:.3f}x dense", flush=True)
                except Exception as error:  # shared-memory overflow etc.: record and go on
                    row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
                    print(f"{config} {kernel:9s} {tile:16s} failed {row['error']}", flush=True)
                row["fp8_dots_patched"] = triton_fp8_acc.patched_dot_count() - patched_before
                if fp8_acc is not None and "ms" in row and not row["fp8_dots_patched"]:
                    unpatched.append(f"{config} {tile} acc {fp8_acc}")
                rows.append(row)
    best = {}
    for row in rows:
        key = (row["config"], row["kernel"], row.get("fp8_max_imprecise_acc"))
        if row.get("ratio") and row["ratio"] > best.get(key, {}).get("ratio", 0):
            best[key] = row
    print("\nbest tile per kernel:")
    for (config, kernel, acc), row in sorted(best.items(), key=str):
        print(f"  {config} {kernel:9s} {row['tile']:16s} {'' if acc is None else f'acc {acc} '}"
              f"{row['ratio']:.3f}x dense ({row['ms']:.3f} ms)")
    with open(args.json, "w") as f:
        json.dump({"devices": str(jax.devices()), "jax": jax.__version__, "fp8_max_imprecise_acc": fp8_accs,
                   "rows": rows}, f, indent=1)
    if unpatched:
        raise SystemExit(f"maxNumImpreciseAcc was set but no FP8 Triton dot was lowered with it "
                         f"({unpatched}): the shim did not run, so those timings are jax's default")


if __name__ == "__main__":
    main()
