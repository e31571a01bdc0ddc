"""GPU check of lowbit.kernels.grouped_mosaic against a float64 grouped product of the same (exact) inputs.

Cases: uneven groups, empty groups, rows past sum(g) (zeros), sum(g) > M (rows dropped), one group,
block-aligned and unaligned boundaries; one-warpgroup and warp-specialized kernels; bf16 with
rhs [E, K, N] and [E, N, K], FP8 E4M3/E5M2 with [E, N, K], with and without a scale.
Prints one line per case and exits non-zero on any failure.
Tolerance: the result rounded once to bf16 (2^-8 relative) plus accumulation error against sum |x|·|w|:
1e-5 of it for 16-bit (f32 accumulator), 2^-10 for FP8 (Hopper's FP8 WGMMA keeps ~14 bits while adding).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.kernels.grouped_mosaic import grouped_matmul_mosaic

CASES = [  # (M, K, N, group sizes)
    (512, 256, 256, [100, 0, 300, 50]),          # unaligned, one empty, 62 zero rows
    (512, 256, 256, [128, 128, 0, 256]),         # block-aligned boundaries
    (384, 512, 384, [384]),                      # one group
    (300, 256, 128, [200, 200]),                 # sum > M: rows past M dropped
    (1000, 256, 256, [1, 3, 7, 500, 0, 0, 489]),  # tiny groups
]


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0
    for dtype, layout, scale in [(jnp.bfloat16, "ekn", None), (jnp.bfloat16, "enk", 0.25),
                                 (jnp.float8_e4m3fn, "enk", None), (jnp.float8_e4m3fn, "enk", 3.0),
                                 (jnp.float8_e5m2, "enk", None)]:
        for (m, k, n, sizes), ws in [(case, ws) for ws in (False, True) for case in CASES]:
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
            gs = jnp.asarray(sizes, jnp.int32)
            w_in = w if layout == "ekn" else jnp.swapaxes(w, 1, 2)
            tile = (128, 64 if ws else 128, 64 if jnp.dtype(dtype).itemsize == 2 else 128)
            try:
                fn = functools.partial(grouped_matmul_mosaic, rhs_layout=layout, scale=scale, tile=tile,
                                       warp_specialized=ws)
                got = np.asarray(jax.jit(fn)(x, w_in, gs), np.float32)
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"FAIL {jnp.dtype(dtype).name} {layout} ws={ws} {m}x{k}x{n} {sizes}: "
                      f"{type(err).__name__}: {str(err)[:300]}")
                failures += 1
                continue
            xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
            ref = np.zeros((m, n))
            bound = np.zeros((m, n))
            start = 0
            for e, size in enumerate(sizes):
                end = min(start + size, m)
                ref[start:end] = xf[start:end] @ wf[e]
                bound[start:end] = np.abs(xf[start:end]) @ np.abs(wf[e])
                start = end
            ref *= scale or 1.0
            bound *= scale or 1.0
            err = np.abs(got - ref)
            acc_tol = 1e-5 if jnp.dtype(dtype).itemsize == 2 else 2.0 ** -10
            ok = bool(np.all(err <= 2.0 ** -8 * np.abs(ref) + acc_tol * bound + 1e-30))
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {jnp.dtype(dtype).name} {layout} ws={ws} scale={scale} "
                  f"{m}x{k}x{n} {sizes}: max err {err.max():.3g}, max |ref| {np.abs(ref).max():.3g}, "
                  "zero rows "
                  f"{'exact' if np.all(got[start:] == 0) else 'NOT ZERO'}")
            failures += not np.all(got[start:] == 0)
    print(f"{failures} failure(s); jax {jax.__version__}, {jax.devices()[0].device_kind}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
