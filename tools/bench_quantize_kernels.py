"""Fused Pallas quantization vs the XLA path vs a copy, on one GPU: bit-equality first, then time.

Run on the GPU machine:  python tools/bench_quantize_kernels.py   (writes a table + JSON into $OUT if set)
Per format: bits of quantize_fused == bits of lowbit.quantize (random + edge inputs, nearest rounding),
then median time per call of N back-to-back calls (one block_until_ready at the end, input buffers
rotated), GB/s = (bytes of x read + bytes of data, scales and tensor scale written) / time, and the
fraction of the best copy's GB/s. Every variant is fenced: a failure is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowbit
from lowbit.kernels import quantize_fused

# (label, format, lowbit.quantize kwargs shared by both paths)
FORMATS: list[tuple[str, str, dict[str, Any]]] = [
    ("mxfp8", "mxfp8", {}),
    ("mxfp8 rceil", "mxfp8", {"scale_mode": "rceil"}),
    ("mxfp8_e5m2", "mxfp8_e5m2", {}),
    ("mxfp4", "mxfp4", {}),
    ("mxfp4 rceil", "mxfp4", {"scale_mode": "rceil"}),
    ("nvfp4", "nvfp4", {}),
    ("nvfp4 16x16", "nvfp4", {"axis": (0, 1)}),
]
TILE_SWEEP = [  # (block_rows, block_cols, num_warps)
    (8, 512, 4), (16, 512, 4), (16, 512, 8), (32, 512, 4), (32, 512, 8), (64, 256, 4), (16, 1024, 8),
    (64, 512, 8), (32, 1024, 8),
]


def _bits(a: jax.Array) -> jax.Array:
    """Raw bits of any lowbit output (FP4 as uint4 codes) for an on-device equality check."""
    if a.dtype == jnp.float4_e2m1fn:
        return jax.lax.bitcast_convert_type(a, jnp.uint4).astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    return jax.lax.bitcast_convert_type(a, width)


def _mismatches(q_fused: lowbit.QArray, q_ref: lowbit.QArray) -> dict[str, int]:
    if isinstance(q_fused, jax.Array) and isinstance(q_ref, jax.Array):  # block values: NaN == NaN
        if q_fused.shape != q_ref.shape or q_fused.dtype != q_ref.dtype:
            return {"values": -1}
        both_nan = jnp.isnan(q_fused) & jnp.isnan(q_ref)
        return {"values": int(jnp.sum((_bits(q_fused) != _bits(q_ref)) & ~both_nan))}
    out = {}
    for part in ("data", "scale", "tensor_scale"):
        a, b = getattr(q_fused, part), getattr(q_ref, part)
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            out[part] = -1
            continue
        out[part] = int(jnp.sum(_bits(a) != _bits(b)))
    return out


def _edge_input(rng: np.random.Generator, dtype: Any) -> jax.Array:
    """Zeros, a NaN block, Inf, powers of two, huge and tiny rows, heavy tails (256 x 512)."""
    x = rng.standard_normal((256, 512)).astype(np.float32)
    x[0] = 0.0
    x[1, :32] = 448.0 * 2.0**7
    x[2, 5] = np.nan
    x[3, 40] = -np.inf
    x[4] = 2.0 ** rng.integers(-126, 127, 512)
    x[5] = 1e-40
    x[6] *= 1e30
    x[7] *= 1e-36
    x[8] = rng.standard_t(1.5, 512)
    x[9:24] = x[9:24] * np.exp2(rng.integers(-60, 60, (15, 512)))
    return jnp.asarray(x, dtype)


def _time_per_call(fn: Callable, xs: list[jax.Array], n: int, repeats: int) -> float:
    """Median over `repeats` of (time of n back-to-back calls, one sync at the end) / n, in seconds."""
    jax.block_until_ready(fn(xs[0]))
    jax.block_until_ready([fn(x) for x in xs])
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(xs[i % len(xs)]) for i in range(n)]
        jax.block_until_ready(outs)
        per_call.append((time.perf_counter() - t0) / n)
        del outs
    return statistics.median(per_call)


def _out_bytes(q: lowbit.QArray) -> int:
    n = q.data.size * q.fmt.elem_bits // 8  # FP4 arrays are stored packed on the GPU
    n += 0 if q.scale is None else q.scale.size
    return n + (0 if q.tensor_scale is None else 4)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t_start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        dtype = jnp.dtype(args.dtype)
        keys = jax.random.split(jax.random.key(0), args.buffers)
        self.xs = [jax.random.normal(k, (args.rows, args.cols), jnp.float32).astype(dtype) for k in keys]
        self.edge = _edge_input(np.random.default_rng(1), dtype)
        self.in_bytes = self.xs[0].size * dtype.itemsize
        self.copy_gbs = None

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        ms = row.get("ms")
        msg = f"{row['name']:<44s} "
        msg += f"{ms:8.4f} ms {row['gbs']:7.0f} GB/s {row.get('frac_copy', float('nan')):5.2f} of copy" \
            if ms is not None else "   -"
        if "bit_mismatch" in row:
            msg += f"  mismatches {row['bit_mismatch']}"
        if "error" in row:
            msg += f"  ERROR {' '.join(row['error'].split())[:300]}"
        print(msg, flush=True)

    def run(self, name: str, fn: Callable, *, ref: Callable | None = None, **info: Any) -> None:
        """Check fn against ref bit for bit (random + edge inputs), then time it; never raises."""
        row: dict[str, Any] = {"name": name, **info}
        if self.over_budget():
            row["error"] = "skipped: time budget spent"
            self.record(row)
            return
        try:
            jfn = jax.jit(fn)
            if ref is not None:
                jref = jax.jit(ref)
                mism = _mismatches(jfn(self.xs[0]), jref(self.xs[0]))
                edge = _mismatches(jfn(self.edge), jref(self.edge))
                row["bit_mismatch"] = {k: v for k, v in mism.items()}
                row["bit_mismatch_edge"] = edge
                row["bit_exact"] = all(v == 0 for v in (*mism.values(), *edge.values()))
            out = jfn(self.xs[0])
            out_bytes = _out_bytes(out) if isinstance(out, lowbit.QArray) else out.nbytes
            sec = _time_per_call(jfn, self.xs, self.args.n, self.args.repeats)
            row.update(ms=sec * 1e3, bytes=self.in_bytes + out_bytes,
                       gbs=(self.in_bytes + out_bytes) / sec / 1e9)
            if self.copy_gbs:
                row["frac_copy"] = row["gbs"] / self.copy_gbs
        except Exception as e:  # noqa: BLE001 - a failing variant is data, not a reason to stop
            row["error"] = f"{type(e).__name__}: {e}"[:3000]
            row["traceback"] = traceback.format_exc()[-6000:]
        self.record(row)


def _pallas_copy(x: jax.Array) -> jax.Array:
    """A trivial Pallas Triton kernel: tells 'Triton unavailable' apart from a bug in ours."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    rows = 32 if x.shape[0] % 32 == 0 else 1
    cols = 512 if x.shape[1] % 512 == 0 else x.shape[1]

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(x.shape[0] // rows, x.shape[1] // cols),
        in_specs=[pl.BlockSpec((rows, cols), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((rows, cols), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4),
    )(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--n", type=int, default=50, help="back-to-back calls per timed loop")
    p.add_argument("--repeats", type=int, default=5, help="timed loops; the median is reported")
    p.add_argument("--buffers", type=int, default=3, help="input buffers rotated through the loop")
    p.add_argument("--budget-s", type=float, default=230.0, help="skip variants after this many seconds")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-size / option sweep")
    p.add_argument("--stores-only", action="store_true",
                   help="only the copies and int32-word vs byte stores (twice, interleaved), then a word "
                        "tile sweep")
    p.add_argument("--values-only", action="store_true",
                   help="only the copies and the emulated GEMM's bf16 operand: XLA quantize + dequantize, "
                        "kernel codes + XLA dequantize, kernel block values (values_dtype)")
    p.add_argument("--word-tiles", default="8x512w4,32x512w8,16x1024w8,32x1024w8,64x512w8,16x256w4",
                   help="--stores-only's tile sweep: comma list of <block_rows>x<block_cols>w<num_warps>")
    p.add_argument("--store-rounds", type=int, default=2,
                   help="--stores-only: interleaved rounds of both stores")
    p.add_argument("--sweep-formats", default="mxfp8,mxfp4,nvfp4",
                   help="--stores-only: labels of FORMATS in the word tile sweep (nvfp4 also with its amax "
                        "given)")
    args = p.parse_args(argv)

    print(f"jax {jax.__version__} backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"x=({args.rows}, {args.cols}) {args.dtype}", flush=True)
    b = Bench(args)

    # copies: the bandwidth yardstick (x*1 may be simplified by XLA; -x may not)
    b.run("copy x*1", lambda x: x * 1)
    b.run("copy -x", lambda x: -x)
    b.copy_gbs = max((r["gbs"] for r in b.rows if "gbs" in r), default=None)
    b.run("pallas copy (Triton smoke test)", _pallas_copy)
    if args.stores_only:
        _stores(b)
        return _report(b, args)
    if args.values_only:
        _values(b)
        return _report(b, args)

    for label, fmt, kw in FORMATS:
        def ref(x, fmt=fmt, kw=kw):
            return lowbit.quantize(x, fmt, **kw)

        def fused(x, fmt=fmt, kw=kw):
            return quantize_fused(x, fmt, **kw)

        b.run(f"{label} xla", ref, fmt=label, impl="xla")
        b.run(f"{label} fused", fused, ref=ref, fmt=label, impl="fused")
        if fmt == "nvfp4":  # the kernel alone: tensor amax known (e.g. from the previous step)
            def kernel_only(x, kw=kw):
                return quantize_fused(x, "nvfp4", tensor_amax=jnp.float32(4.0), **kw)
            b.run(f"{label} fused, tensor_amax given", kernel_only, fmt=label, impl="fused-kernel-only")
    b.run("fp8 per-tensor xla", lambda x: lowbit.quantize(x, "fp8"), fmt="fp8", impl="xla")
    for fmt in ("mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4"):  # auto: FP8 convert / E2M1 compares; here integer
        b.run(f"{fmt} fused encode=integer", lambda x, f=fmt: quantize_fused(x, f, encode="integer"),
              ref=lambda x, f=fmt: lowbit.quantize(x, f), fmt=fmt, impl="fused")
    # the element encoders of FP4 and NVFP4's E4M3 block-scale encoder, side by side (auto is the baseline)
    fp4_variants = [("encode=threshold", {"encode": "threshold"})]  # auto: the magic add
    nvfp4_variants = [("scale_encode=integer", {"scale_encode": "integer"}),
                      ("scale_encode=convert", {"scale_encode": "convert"}),
                      ("encode=magic, scale_encode=convert", {"encode": "magic", "scale_encode": "convert"})]
    for label, fmt, kw in (FORMATS[3], FORMATS[5], FORMATS[6]):
        for name, extra in fp4_variants + (nvfp4_variants if fmt == "nvfp4" else []):
            def variant(x, fmt=fmt, kw=kw, extra=extra):
                return quantize_fused(x, fmt, **kw, **extra)

            def reference(x, fmt=fmt, kw=kw):
                return lowbit.quantize(x, fmt, **kw)
            b.run(f"{label} fused {name}", variant, ref=reference, fmt=label, impl="fused")
            if fmt == "nvfp4":
                def given(x, kw=kw, extra=extra):
                    return quantize_fused(x, "nvfp4", tensor_amax=jnp.float32(4.0), **kw, **extra)
                b.run(f"{label} fused {name}, tensor_amax given", given, fmt=label, impl="fused-kernel-only")
    b.run("mxfp8 fused encode=magic", lambda x: quantize_fused(x, "mxfp8", encode="magic"),  # auto: convert
          ref=lambda x: lowbit.quantize(x, "mxfp8"), fmt="mxfp8", impl="fused")

    if not args.no_sweep:
        for label, fmt, kw in (FORMATS[0], FORMATS[3], FORMATS[5]):
            for rows, cols, warps in TILE_SWEEP:
                def tiled(x, fmt=fmt, kw=kw, rows=rows, cols=cols, warps=warps):
                    return quantize_fused(x, fmt, block_rows=rows, block_cols=cols, num_warps=warps, **kw)
                b.run(f"{label} fused tile {rows}x{cols} w{warps}", tiled, fmt=label, impl="fused",
                      tile=[rows, cols, warps])
        b.run("mxfp4 fused fp4_layout=codes", lambda x: quantize_fused(x, "mxfp4", fp4_layout="codes"),
              ref=lambda x: lowbit.quantize(x, "mxfp4"), fmt="mxfp4", impl="fused")
        b.run("nvfp4 fused div=int", lambda x: quantize_fused(x, "nvfp4", div="int"),
              ref=lambda x: lowbit.quantize(x, "nvfp4"), fmt="nvfp4", impl="fused")
        key = jax.random.key(5)
        for fmt in ("mxfp8", "nvfp4"):
            b.run(f"{fmt} SR xla", lambda x, f=fmt: lowbit.quantize(x, f, rounding="stochastic", key=key),
                  fmt=fmt, impl="xla", rounding="stochastic")
            b.run(f"{fmt} SR fused (== xla bits)",
                  lambda x, f=fmt: quantize_fused(x, f, rounding="stochastic", key=key),
                  ref=lambda x, f=fmt: lowbit.quantize(x, f, rounding="stochastic", key=key),
                  fmt=fmt, impl="fused", rounding="stochastic")

    return _report(b, args)


def _stores(b: Bench) -> None:
    """Each format with its codes stored as int32 words and one byte at a time, side by side in two
    interleaved rounds (their spread is the run's noise), then the word store's tiles."""
    for round_ in range(1, b.args.store_rounds + 1):
        for label, fmt, kw in FORMATS:
            for store in ("bytes", "words"):
                def variant(x, fmt=fmt, kw=kw, store=store):
                    return quantize_fused(x, fmt, store=store, **kw)

                def reference(x, fmt=fmt, kw=kw):
                    return lowbit.quantize(x, fmt, **kw)
                b.run(f"{label} fused store={store} (round {round_})", variant, ref=reference, fmt=label,
                      impl="fused", store=store)
                if fmt == "nvfp4":
                    def given(x, kw=kw, store=store):
                        return quantize_fused(x, "nvfp4", tensor_amax=jnp.float32(4.0), store=store, **kw)
                    b.run(f"{label} fused store={store}, tensor_amax given (round {round_})", given,
                          fmt=label,
                          impl="fused-kernel-only", store=store)
    tiles = [tuple(int(v) for v in t.replace("w", "x").split("x")) for t in b.args.word_tiles.split(",") if t]
    labels = b.args.sweep_formats.split(",")
    for label, fmt, kw in [f for f in FORMATS if f[0] in labels]:
        for rows, cols, warps in tiles:
            for amax in ((None, jnp.float32(4.0)) if fmt == "nvfp4" else (None,)):
                def tiled(x, fmt=fmt, kw=kw, rows=rows, cols=cols, warps=warps, amax=amax):
                    extra = {} if amax is None else {"tensor_amax": amax}
                    return quantize_fused(x, fmt, store="words", block_rows=rows, block_cols=cols,
                                          num_warps=warps, **kw, **extra)
                given = "" if amax is None else ", tensor_amax given"
                b.run(f"{label} fused store=words tile {rows}x{cols} w{warps}{given}", tiled, fmt=label,
                      impl="fused" if amax is None else "fused-kernel-only", tile=[rows, cols, warps],
                      store="words")


def _values(b: Bench) -> None:
    """The emulate backend's bf16 operand (data · block scale) three ways, bits checked against XLA's."""
    from lowbit.backends.emulate import split_scales
    from lowbit.kernels.dequantize_pallas import block_values_fused

    for label, fmt, kw in FORMATS:
        def xla(x, fmt=fmt, kw=kw):
            return split_scales(lowbit.quantize(x, fmt, **kw), jnp.bfloat16)[0]

        def codes(x, fmt=fmt, kw=kw):
            return split_scales(quantize_fused(x, fmt, **kw), jnp.bfloat16)[0]

        def values(x, fmt=fmt, kw=kw):
            return quantize_fused(x, fmt, values_dtype=jnp.bfloat16, **kw).values

        b.run(f"{label} bf16 operand: xla quantize + dequantize", xla, fmt=label, impl="xla-values")
        b.run(f"{label} bf16 operand: kernel codes + xla dequantize", codes, ref=xla, fmt=label,
              impl="fused-codes-values")
        b.run(f"{label} bf16 operand: kernel values", values, ref=xla, fmt=label, impl="fused-values")

        def codes_then_values(x, fmt=fmt, kw=kw):  # a stored residual: codes now, block values later
            return block_values_fused(quantize_fused(x, fmt, **kw)).values

        b.run(f"{label} bf16 operand: kernel codes + kernel block values", codes_then_values, ref=xla,
              fmt=label,
              impl="fused-codes-fused-values")


def _report(b: Bench, args: argparse.Namespace) -> int:
    bad = [r["name"] for r in b.rows if r.get("bit_exact") is False]
    failed = [r["name"] for r in b.rows if "error" in r]
    print(f"\n{len(b.rows)} variants, {len(failed)} failed, {len(bad)} not bit-exact: {bad}")
    print(f"total {time.perf_counter() - b.t_start:.0f} s")
    out_dir = os.environ.get("OUT")
    if out_dir:
        result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "args": vars(args),
                  "copy_gbs": b.copy_gbs, "rows": b.rows}
        with open(os.path.join(out_dir, "bench_quantize_kernels.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(out_dir, "bench_quantize_kernels.md"), "w") as f:
            f.write("| variant | ms | GB/s | of copy | bit-exact | error |\n|---|---|---|---|---|---|\n")
            for r in b.rows:
                err = " ".join(r.get("error", "").split())[:160].replace("|", "/")
                ms = f"{r['ms']:.4f}" if "ms" in r else ""
                gbs = f"{r['gbs']:.0f}" if "gbs" in r else ""
                frac = f"{r['frac_copy']:.2f}" if "frac_copy" in r else ""
                f.write(f"| {r['name']} | {ms} | {gbs} | {frac} | {r.get('bit_exact', '')} | {err} |\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
