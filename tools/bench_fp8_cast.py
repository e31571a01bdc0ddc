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
from lowbit.kernels.fp8_cast_pallas import fp8_cast, fp8_cast_scaled

# delayed scaling's cast+transpose (no amax pass) on the moe-2.8b step's operands: expert hidden dY, expert
# X, the f32 expert weights, the attention projections' X
SCALED_SHAPES = {"full": [((8, 5120, 5120), "fp8_e5m2", jnp.bfloat16), ((8, 5120, 2560), "fp8", jnp.bfloat16),
                          ((8, 2560, 5120), "fp8", jnp.float32), ((16384, 2560), "fp8", jnp.bfloat16)],
                 "tiny": [((2, 128, 256), "fp8", jnp.bfloat16)]}
SCALED_TILES = [  # (tile, warps, transposed copy stored 4 codes per int32 word)
    ((64, 64), 8, False), ((64, 64), 8, True), ((64, 64), 4, False), ((64, 64), 4, True),
    ((64, 128), 8, False), ((64, 128), 8, True), ((128, 64), 8, True), ((128, 128), 8, True),
    ((128, 128), 4, True)]
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


def parse_tiles(spec: str) -> list[tuple[tuple[int, int], int, bool]]:
    """'128x64w8p,256x64w4' -> [((128, 64), 8, True), ((256, 64), 4, False)]: rows x cols, warps,
    p = packed."""
    tiles = []
    for item in filter(None, spec.split(",")):
        pack = item.endswith("p")
        shape, warps = item.rstrip("p").split("w")
        rows, cols = shape.split("x")
        tiles.append(((int(rows), int(cols)), int(warps), pack))
    return tiles


def scaled_rows(size: str, n: int, repeats: int, interpret: bool,
                tiles: list[tuple[tuple[int, int], int, bool]] | None = None) -> list[dict]:
    """fp8_cast_scaled(transpose=True) per tile: bits equal to the default tile's, then ms and GB/s counting
    x read once and both FP8 layouts written, against a copy of x in the same process."""
    rows = []
    for shape, fmt, dtype in SCALED_SHAPES[size]:
        x = jax.random.normal(jax.random.key(sum(shape)), shape, dtype)
        scale = jnp.float32(4.0 / 448)
        ref = [np.asarray(q.data).view(np.uint8) for q in fp8_cast_scaled(x, fmt, scale, transpose=True,
                                                                         interpret=interpret)[:2]]
        moved = x.size * (x.dtype.itemsize + 2)
        copy_ms = loop_ms(jax.jit(lambda a: a * 1), x, n, repeats)
        label = f"{'x'.join(map(str, shape))} {jnp.dtype(dtype).name} {fmt}"
        print(f"{label:>34} copy {copy_ms:8.3f} ms {2 * x.nbytes / copy_ms / 1e6:7.0f} GB/s", flush=True)
        for block, warps, pack in tiles or SCALED_TILES:
            fn = jax.jit(lambda a, f=fmt, s=scale, b=block, w=warps, k=pack: [q.data for q in fp8_cast_scaled(
                a, f, s, transpose=True, block=b, num_warps=w, interpret=interpret, pack_transpose=k)[:2]])
            row = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "format": fmt, "tile": list(block),
                   "warps": warps, "pack_transpose": pack, "copy_ms": copy_ms}
            try:
                got = [np.asarray(d).view(np.uint8) for d in fn(x)]
                row["bit_mismatches"] = int(sum((g != r).sum() for g, r in zip(got, ref, strict=True)))
                ms = loop_ms(fn, x, n, repeats)
                row.update(ms=ms, gb_s=moved / ms / 1e6, of_copy=(moved / ms) / (2 * x.nbytes / copy_ms))
                print(f"{label:>34} scaled cast+transpose {block} w{warps}{' packed' * pack} {ms:8.3f} ms "
                      f"{row['gb_s']:7.0f} GB/s {row['of_copy']:5.2f} of copy  bits differ: "
                      f"{row['bit_mismatches']}", flush=True)
            except Exception as error:  # a tile that does not compile is a row, not the end of the run
                row["error"] = f"{type(error).__name__}: {error}"[:500]
                print(f"{label:>34} tile {block} w{warps} pack {pack}: {row['error'][:120]}", flush=True)
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SHAPES), default="full")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--scaled-only", action="store_true", help="only the scaled (delayed) cast+transpose rows")
    p.add_argument("--scaled-tiles", default="",
                   help="their tiles, e.g. 128x64w8p,256x64w4p (p: packed words)")
    args = p.parse_args()
    interpret = jax.default_backend() != "gpu"
    rows = []
    for m, n, fmt in [] if args.scaled_only else SHAPES[args.size]:
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
    rows += scaled_rows(args.size, args.n, args.repeats, interpret, parse_tiles(args.scaled_tiles))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": str(jax.devices()), "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
