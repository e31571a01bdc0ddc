"""Quick quantize throughput check (the full table comes from `python -m lowbit.bench quantize`)."""
import time

import jax
import jax.numpy as jnp
import numpy as np

import lowbit


def bench(fn, x, n=20):
    jax.block_until_ready(fn(x))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


x = jax.random.normal(jax.random.key(0), (16384, 4096), jnp.bfloat16)
nbytes = x.size * 2
copy = bench(jax.jit(lambda x: x * 1), x)
print(f"copy {copy*1e3:.3f} ms  {2*nbytes/copy/1e9:.0f} GB/s")
for fmt, kw in [("mxfp8", {}), ("mxfp8", {"scale_mode": "rceil"}), ("mxfp4", {}), ("nvfp4", {}),
                ("nvfp4", {"axis": (0, 1)}), ("fp8", {})]:
    f = lowbit.get_format(fmt)
    q = jax.jit(lambda x, f=f, kw=kw: lowbit.quantize(x, f, **kw))
    t = bench(q, x)
    out = x.size * f.storage_dtype.dtype.itemsize + (x.size // max(f.block_size, 1) if f.block_size else 0)
    gbs = (nbytes + out) / t / 1e9
    print(f"{fmt:6s} {kw} quantize {t*1e3:.3f} ms {gbs:.0f} GB/s = {gbs/(2*nbytes/copy/1e9):.2f} of copy")
