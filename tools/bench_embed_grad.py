"""The token embedding's table gradient: scatter-add vs the one-hot GEMM (decoder `embed_grad`).

Run on the GPU machine:  python tools/bench_embed_grad.py [--json FILE]
Per (tokens, vocab, width, token distribution): each gradient's error against the float64 row sums of dY
(the GEMM's and the float32 scatter's must be within one bfloat16 rounding, 2^-8 of the largest row;
"scatter-bf16", nnx.Embed's own gradient, adds in bfloat16 and is only reported), then the median time
of back-to-back jitted grads (one block at the end). Distributions: uniform ids, and Zipf(1.1) ids (real
text: a few hot rows, which serialise the scatter's atomics).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.model.decoder import embed_tokens

SHAPES = {"full": [(8, 2048, 32768, 2048), (8, 2048, 32768, 2560), (64, 512, 256, 512)],
          "tiny": [(2, 64, 512, 32)]}  # (batch, length, vocab, width); moe-1.8b, moe-2.8b, small


def tokens_of(dist: str, batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return ((rng.zipf(1.1, (batch, length)) - 1) % vocab).astype(np.int32)


def _table_grad(graphdef, grad: str, params, tokens, dy):
    def loss(params):
        embedder = nnx.merge(graphdef, params)
        out = embedder(tokens) if grad == "scatter-bf16" else embed_tokens(embedder, tokens, False, grad)
        return jnp.sum(out.astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.grad(loss)(params)["embedding"][...]


def loop_ms(fn, n: int, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn() for _ in range(n)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="full")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}", flush=True)
    rows = []
    for batch, length, vocab, width in SHAPES[args.size]:
        embedder = nnx.Embed(vocab, width, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(embedder)
        dy = jax.random.normal(jax.random.key(1), (batch, length, width), jnp.bfloat16)
        for dist in ("uniform", "zipf"):
            tokens = jnp.asarray(tokens_of(dist, batch, length, vocab, 2))
            grads, times = {}, {}
            for grad in ("scatter-bf16", "scatter", "gemm"):
                table_grad = jax.jit(functools.partial(_table_grad, graphdef, grad))
                grads[grad] = np.asarray(table_grad(params, tokens, dy), np.float64)
                times[grad] = loop_ms(functools.partial(table_grad, params, tokens, dy), args.n, args.repeats)
            want = np.zeros((vocab, width))
            np.add.at(want, np.asarray(tokens).ravel(), np.asarray(dy, np.float64).reshape(-1, width))
            scale = np.abs(want).max() or 1.0
            err = {g: float(np.abs(grads[g] - want).max() / scale) for g in grads}
            row = {"batch": batch, "length": length, "vocab": vocab, "width": width, "tokens": dist,
                   "scatter_ms": times["scatter"], "gemm_ms": times["gemm"],
                   "scatter_bf16_ms": times["scatter-bf16"],
                   "scatter_over_gemm": times["scatter"] / times["gemm"], "scatter_err": err["scatter"],
                   "scatter_bf16_err": err["scatter-bf16"], "gemm_err": err["gemm"],
                   "ok": max(err["gemm"], err["scatter"]) <= 2.0**-8}
            rows.append(row)
            print(f"{batch}x{length} V={vocab} D={width} {dist:<8} ms: "
                  f"scatter-bf16 {times['scatter-bf16']:7.3f} scatter {times['scatter']:7.3f} "
                  f"gemm {times['gemm']:7.3f}  err vs f64: scatter-bf16 {err['scatter-bf16']:.1e} "
                  f"scatter {err['scatter']:.1e} gemm {err['gemm']:.1e}  {'ok' if row['ok'] else 'FAIL'}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
