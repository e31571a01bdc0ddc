"""Find which step of NVFP4 quantization differs between GPU and CPU for bf16 inputs."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import lowbit

Q = sys.modules["lowbit.quantize"]

rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16)
accel, cpu = jax.devices()[0], jax.devices("cpu")[0]


def steps(x):
    xf = Q._flush_subnormals(x.astype(jnp.float32))
    xb = xf.reshape(64, 16, 16)
    absb = jnp.abs(xb)
    amax_b = jnp.max(absb, axis=-1, keepdims=True)
    ts = jnp.maximum(jnp.max(absb) / np.float32(2688.0), 2.0**-126)
    b1 = amax_b / np.float32(6.0)
    b = b1 / ts
    bs = Q.round_to_grid(jnp.clip(b, 2.0**-6, 448.0), lowbit.FP8)
    total = ts * bs
    y = xb / total
    return dict(xf=xf, ts=ts, b1=b1, b=b, bs=bs, total=total, y=y)


def steps_f32(x):
    return steps(x.astype(jnp.float32))


for name, fn, inp in (("bf16", steps, x), ("f32-input", steps_f32, x)):
    res = []
    for dev in (accel, cpu):
        with jax.default_device(dev):
            res.append(jax.device_get(jax.jit(fn)(jax.device_put(inp, dev))))
    for k in res[0]:
        a, c = np.asarray(res[0][k]), np.asarray(res[1][k])
        n = int((a.view(np.uint32) != c.view(np.uint32)).sum())
        print(f"{name:10s} {k:6s} differing={n}")
    hlo = jax.jit(fn).lower(inp).compile().as_text()
    print([l.strip()[:160] for l in hlo.splitlines() if "divide" in l or " multiply(" in l][:12])
