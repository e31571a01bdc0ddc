"""Per-tensor FP8 cast: XLA (lowbit.quantize, + a transposed copy) vs the Pallas cast(+transpose) kernel.

Run on the GPU machine:  python tools/bench_fp8_cast.py [--json FILE]
Per shape: bits of lowbit.kernels.fp8_cast_pallas.fp8_cast == lowbit.quantize's (and its transposed copy
== the transpose of those bits), then the median time of back-to-back calls (one block at the end) for
a copy, XLA's cast, XLA's cast + transposed copy, and the kernel at a few tile sizes. Shapes: the
fifth-session profile's largest casts (expert hidden dY [8*5120, 4096] E5M2, activations [16384, 4096]).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lowbit
from lowbit.kernels.fp8_cast_pallas import fp8_cast

SHAPES = {"full": [(40960, 4096, "fp8_e5m2"), (16384, 4096, "fp8"), (16384, 14336, "fp8_e5m2")],
          "tiny": [(256, 512, "fp8")]}


def loop_ms(fn, x, n: int, repeats: int) -> float:
    """Median over `repeats` of (n back-to-back calls, one block at the end) / n, in ms."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(x) for _ in range(n)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SHAPES), default="full")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    interpret = jax.default_backend() != "gpu"
    rows = []
    for m, n, fmt in SHAPES[args.size]:
        x = jax.random.normal(jax.random.key(m + n), (m, n), jnp.bfloat16)
        ref = lowbit.quantize(x, fmt)
        q, qt = fp8_cast(x, fmt, transpose=True, interpret=interpret)
        ref_bits = np.asarray(ref.data).view(np.uint8)
        mismatch = int((np.asarray(q.data).view(np.uint8) != ref_bits).sum()
                       + (np.asarray(qt.data).view(np.uint8) != ref_bits.T).sum())
        elems = m * n
        variants = {
            "copy (bf16 read + write)": (jax.jit(lambda a: a * 1), 4),
            "xla quantize": (jax.jit(lambda a, f=fmt: lowbit.quantize(a, f).data), 3),
            "xla quantize + transposed copy": (jax.jit(lambda a, f=fmt: (lambda d: (d, d.T.copy()))(
                lowbit.quantize(a, f).data)), 4),
        }
        for block, warps in ((64, 4), (64, 8), (128, 8), (32, 4)):
            variants[f"kernel convert cast+transpose, tile {block} w{warps}"] = (jax.jit(
                lambda a, f=fmt, b=block, w=warps: [q.data for q in fp8_cast(
                    a, f, transpose=True, block=b, num_warps=w, interpret=interpret, encode="convert")]), 4)
            variants[f"kernel cast, tile {block} w{warps}"] = (jax.jit(
                lambda a, f=fmt, b=block, w=warps: fp8_cast(a, f, block=b, num_warps=w,
                                                            interpret=interpret)[0].data), 3)
            variants[f"kernel cast+transpose, tile {block} w{warps}"] = (jax.jit(
                lambda a, f=fmt, b=block, w=warps: [q.data for q in fp8_cast(
                    a, f, transpose=True, block=b, num_warps=w, interpret=interpret)]), 4)
        for name, (fn, bytes_per_elem) in variants.items():
            row = {"shape": f"{m}x{n}", "format": fmt, "variant": name, "bit_mismatches": mismatch}
            try:
                ms = loop_ms(fn, x, args.n, args.repeats)
                # amax read (2 B) is counted for the quantize rows: + 2 B/element
                moved = bytes_per_elem + (0 if name.startswith("copy") else 2)
                row.update(ms=ms, gb_s=moved * elems / ms / 1e6)
            except Exception as error:  # a tile that does not compile is a row, not the end of the run
                row["error"] = f"{type(error).__name__}: {error}"[:500]
            rows.append(row)
            print(f"{row['shape']:>12} {fmt:8s} {name:36s} "
                  + (f"{row['ms']:8.3f} ms {row['gb_s']:7.0f} GB/s" if "ms" in row else row["error"][:120])
                  + f"  bits differ: {mismatch}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": str(jax.devices()), "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
