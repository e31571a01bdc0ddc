"""Accuracy of FP8 grouped GEMMs per Triton maxNumImpreciseAcc setting, against float64 (GPU diagnostic).

Hopper's FP8 WGMMA adds into an accumulator that keeps fewer bits than f32 (DeepSeek-V3, arXiv:2412.19437
sec. 3.3.2: ~14); Triton promotes the partial sums into a true f32 accumulator every maxNumImpreciseAcc K
elements (lowbit.kernels.triton_fp8_acc). This multiplies the same per-tensor E4M3 operands (values exact in
float64) by the Pallas grouped GEMM at each setting and by XLA's FP8 GEMM (cuBLASLt), f32 out, and prints
rms |out - ref| / rms |ref| and max |out - ref| / max |ref|, ref = the float64 product on the host.
Usage: python tools/fp8acc_accuracy.py --settings none,128,1073741824 --json /tmp/fp8acc.json
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.bench_gemm import per_tensor_fp8
from lowbit.kernels import triton_fp8_acc
from lowbit.kernels.grouped_pallas import grouped_matmul

TN = (((1,), (1,)), ((), ()))


def errors(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = out.astype(np.float64) - ref
    return {"rel_rms_err": float(np.sqrt(np.mean(diff**2) / np.mean(ref**2))),
            "rel_max_err": float(np.abs(diff).max() / np.abs(ref).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="none,128,1073741824")
    p.add_argument("--shapes", default="2048x4096x1024,1024x16384x1024", help="MxKxN,... (4 uneven groups)")
    p.add_argument("--tile", default="128:128:256:8:3", help="bm:bk:bn:warps:stages")
    p.add_argument("--json", default="/tmp/fp8acc_accuracy.json")
    args = p.parse_args()
    bm, bk, bn, warps, stages = (int(v) for v in args.tile.split(":"))
    try:
        settings = [triton_fp8_acc.parse_setting(v, "--settings") for v in args.settings.split(",")]
    except (TypeError, ValueError) as error:
        p.error(str(error))
    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        sizes = np.array([m * 11 // 32, m * 9 // 32, m * 7 // 32, 0])
        sizes[3] = m - sizes[:3].sum() - 8  # the last 8 rows belong to no group: zeros
        if sizes[3] < 0:  # M < 38: a negative group size would make grouped_matmul read garbage
            p.error(f"--shapes {shape}: M too small for 4 uneven groups and 8 rows in none; use M >= 64")
        keys = jax.random.split(jax.random.key(m + k + n), 2)
        x8 = per_tensor_fp8(jax.random.normal(keys[0], (m, k), jnp.float32))[0]
        w8 = per_tensor_fp8(jax.random.normal(keys[1], (4, n, k), jnp.float32) / np.sqrt(k))[0]
        x64, w64 = np.asarray(x8, np.float64), np.asarray(w8, np.float64)
        ends = np.cumsum(sizes)
        ref = np.zeros((m, n))
        for e, (s, t) in enumerate(zip(ends - sizes, ends, strict=True)):
            ref[s:t] = x64[s:t] @ w64[e].T
        xla_fp8 = jax.jit(lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=jnp.float32))
        dense = np.asarray(xla_fp8(x8, w8[0]))
        row = {"shape": shape, "variant": "XLA FP8 dot (cuBLASLt), expert 0 for all rows",
               **errors(dense, x64 @ w64[0].T)}
        rows.append(row)
        print(f"{shape:16s} {row['variant']:44s} rms {row['rel_rms_err']:.3e} max {row['rel_max_err']:.3e}",
              flush=True)
        for value in settings:
            triton_fp8_acc.set_fp8_max_imprecise_acc(value)
            before = triton_fp8_acc.patched_dot_count()
            out = jax.jit(lambda a, b, s: grouped_matmul(
                a, b, s, rhs_layout="enk", preferred_element_type=jnp.float32, tile=(bm, bk, bn),
                num_warps=warps, num_stages=stages))(x8, w8, jnp.asarray(sizes, jnp.int32))
            label = "none" if value is None else value
            row = {"shape": shape, "variant": f"pallas grouped, maxNumImpreciseAcc {label}",
                   "fp8_dots_patched": triton_fp8_acc.patched_dot_count() - before,
                   **errors(np.asarray(out), ref)}
            rows.append(row)
            print(f"{shape:16s} {row['variant']:44s} rms {row['rel_rms_err']:.3e} "
                  f"max {row['rel_max_err']:.3e}  (patched dots {row['fp8_dots_patched']})", flush=True)
    triton_fp8_acc.set_fp8_max_imprecise_acc(None)
    with open(args.json, "w") as f:
        json.dump({"devices": str(jax.devices()), "jax": jax.__version__, "tile": args.tile, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
