"""Check that lowbit.quantize gives the same bits on the accelerator as on the CPU backend.

Run on a GPU machine: `python tools/gpu_parity.py` (prints a table; exit 1 on any mismatch).
Inputs: normal, heavy-tailed and wide-range data plus edge cases (zeros, NaN/Inf blocks, powers of
two, element maxima); every format x scale mode x axis; stochastic rounding with a fixed key too.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import lowbit


def _inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    wide = rng.standard_normal((64, 256)) * np.exp2(rng.integers(-40, 40, (64, 256)))
    edge = rng.standard_normal((64, 256)).astype(np.float32)
    edge[0] = 0.0
    edge[1, :32] = 448.0 * 2.0 ** rng.integers(-20, 20)
    edge[2, 5] = np.nan
    edge[3, 40] = np.inf
    edge[4, :] = 2.0 ** rng.integers(-30, 30, 256)
    edge[5, :] = 1e-40
    edge[6, :] = rng.standard_t(2.0, 256)
    return {"wide": wide, "edge": edge}


def _bits(a: jax.Array | None) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(jax.device_get(a))
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def main() -> int:
    accel = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    print(f"jax {jax.__version__} accelerator={accel.device_kind} vs cpu")
    rng = np.random.default_rng(0)
    failures = 0
    rows = 0
    cases = [
        (fmt, mode, axis, rounding)
        for fmt in ("mxfp8", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4", "fp8")
        for mode in (("floor", "rceil") if fmt.startswith("mx") else ("floor",))
        for axis in (-1, (0, 1))
        for rounding in ("nearest", "stochastic")
        if not (axis == (0, 1) and fmt == "fp8")
    ]
    for name, x in _inputs(rng).items():
        for dtype in (jnp.float32, jnp.bfloat16):
            for fmt, mode, axis, rounding in cases:
                key = jax.random.key(7) if rounding == "stochastic" else None

                def f(x, key=key, fmt=fmt, mode=mode, axis=axis, rounding=rounding):
                    return lowbit.quantize(x, fmt, axis=axis, rounding=rounding, key=key,
                                           scale_mode=mode)

                outs = []
                for dev in (accel, cpu):
                    xd = jax.device_put(jnp.asarray(x, dtype), dev)
                    with jax.default_device(dev):
                        q = jax.jit(f)(xd)
                    outs.append([_bits(q.data), _bits(q.scale), _bits(q.tensor_scale)])
                rows += 1
                for part, a, b in zip(("data", "scale", "tensor_scale"), *outs, strict=True):
                    if a is None and b is None:
                        continue
                    if a is None or b is None or not np.array_equal(a, b):
                        n = -1 if a is None or b is None else int((a != b).sum())
                        failures += 1
                        print(f"MISMATCH {name} {np.dtype(dtype).name} {fmt} {mode} axis={axis} "
                              f"{rounding} {part}: {n} differing entries")
    print(f"{rows} cases, {failures} mismatching parts")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
