"""Generate notebooks/*.ipynb from the cell sources below: `python notebooks/_build.py`.

The notebooks are committed with their outputs cleared (small, reviewable diffs); run them with
Jupyter, or `python -m pytest tests/test_notebooks.py`, which executes every one. Edit the sources
here, not the .ipynb files, then regenerate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# Shared first code cell: inline figures at low DPI so executed notebooks stay small.
SETUP = """\
%matplotlib inline
import matplotlib.pyplot as plt
plt.rcParams.update({"figure.dpi": 60, "savefig.dpi": 60, "figure.figsize": (8, 3.6), "axes.grid": True,
                     "grid.alpha": 0.3})
"""

FORMATS_NB = [
    ("md", """\
# 1. Formats: element grids, scales and quantization error

A block-scaled format stores each value as **element x shared scale**. The element is a tiny float
(FP4 E2M1, FP6 E2M3/E3M2, FP8 E4M3/E5M2); the scale is shared by a block of 16 or 32 neighbours
along one axis (an E8M0 power of two for OCP MX, an E4M3 number times an FP32 tensor scale for
NVFP4). This notebook looks at the grids, at how the scale is chosen, and at the error that results.
"""),
    ("code", SETUP + """\
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import lowbit
"""),
    ("md", """\
## Element grids

Every finite value of each element type, straight from `ml_dtypes` (all bit patterns, decoded).
The spacing doubles every binade: relative precision is constant (2^-mbits) except in the
subnormal range near zero.
"""),
    ("code", """\
ELEMENT_TYPES = {"E2M1 (FP4)": ml_dtypes.float4_e2m1fn, "E2M3 (FP6)": ml_dtypes.float6_e2m3fn,
                 "E3M2 (FP6)": ml_dtypes.float6_e3m2fn, "E4M3 (FP8)": ml_dtypes.float8_e4m3fn,
                 "E5M2 (FP8)": ml_dtypes.float8_e5m2}


def grid(dtype) -> np.ndarray:
    \"\"\"Sorted non-negative finite values of a <= 8-bit float type (every bit pattern decoded).\"\"\"
    bits = ml_dtypes.finfo(dtype).bits
    values = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values) & (values >= 0)] + 0.0)  # + 0.0 turns -0 into 0


fig, ax = plt.subplots(figsize=(8, 2.8))
print(f"{'type':<12}{'values>=0':>10}{'max':>10}{'min normal':>12}{'min subnormal':>15}{'mbits':>6}")
for row, (name, dtype) in enumerate(ELEMENT_TYPES.items()):
    values, info = grid(dtype), ml_dtypes.finfo(dtype)
    ax.plot(values[1:], np.full(len(values) - 1, row), "|", markersize=12)
    print(f"{name:<12}{len(values):>10}{float(info.max):>10g}{float(info.smallest_normal):>12g}"
          f"{float(info.smallest_subnormal):>15g}{info.nmant:>6}")
ax.set_xscale("log", base=2)
ax.set_yticks(range(len(ELEMENT_TYPES)), list(ELEMENT_TYPES))
ax.set_xlabel("positive grid values (log2 axis)")
ax.set_title("element grids")
plt.show()
print("E2M1 grid:", grid(ml_dtypes.float4_e2m1fn))
"""),
    ("md", """\
## How an MX scale is chosen: FLOOR vs RCEIL

For a block with maximum magnitude `amax`, OCP MX v1.0 (sec. 6.3) takes the shared exponent
`s = floor(log2 amax) - emax_elem` ("floor"): the block max lands in `[2^emax, 2^(emax+1))`,
which for E2M1 is `[4, 8)`, so values above 6 are **clipped** to 6. NVIDIA's hardware rule
("rceil") rounds `amax / elem_max` **up** to a power of two: nothing clips, but the block max
then lands in `(3, 6]` and the top of the grid is used less. Below: a sweep of block amax over
four binades for MXFP4 (one block of 32, amax in element 0).
"""),
    ("code", """\
amax_sweep = np.geomspace(0.5, 8.0, 400, dtype=np.float32)
ramp = np.linspace(1.0, 0.1, lowbit.MXFP4.block_size, dtype=np.float32)
blocks = jnp.asarray(amax_sweep[:, None] * ramp[None, :])            # [400 blocks, 32]


@functools.partial(jax.jit, static_argnames=("fmt", "scale_mode"))
def scale_and_qdq(x, fmt, scale_mode):
    q = lowbit.quantize(x, fmt, scale_mode=scale_mode)
    return q.scale.astype(jnp.float32), q.dequantize()


fig, (ax_s, ax_y) = plt.subplots(1, 2, figsize=(10, 3.6))
sweep = {}
for mode in ("floor", "rceil"):
    scale, xhat = scale_and_qdq(blocks, lowbit.MXFP4, mode)
    scale = np.asarray(scale[:, 0])
    scaled_amax = amax_sweep / scale                                  # what the element grid sees
    clip_err = np.abs(np.asarray(xhat[:, 0]) - amax_sweep) / amax_sweep
    sweep[mode] = scaled_amax, clip_err
    ax_s.step(amax_sweep, np.log2(scale), where="post", label=mode)
    ax_y.plot(amax_sweep, scaled_amax, label=mode)
ax_y.axhline(6.0, color="k", linestyle=":", label="E2M1 max = 6")
for ax in (ax_s, ax_y):
    ax.set_xscale("log", base=2)
ax_s.set(xlabel="block amax", ylabel="scale exponent s", title="MXFP4 shared exponent")
ax_y.set(xlabel="block amax", ylabel="amax / 2^s", title="where the block max lands")
ax_s.legend(); ax_y.legend()
plt.show()
for mode, (scaled_amax, clip_err) in sweep.items():
    print(f"{mode:>5}: amax/2^s in [{scaled_amax.min():.3f}, {scaled_amax.max():.3f}]; "
          f"blocks whose max clips: {np.mean(scaled_amax > 6):.0%}; worst error of the block max: "
          f"{clip_err.max():.1%}")
"""),
    ("md", """\
## NVFP4's two levels

NVFP4 (arXiv 2509.25149, sec. 2) first takes a per-tensor FP32 scale `ts = tensor_amax / (448*6)`,
then per block of 16 an E4M3 scale `RNE_e4m3((block_amax / 6) / ts)`, clamped to `[2^-6, 448]`.
The E4M3 scale is not a power of two, so the block max lands close to 6 (within E4M3's 3-bit
rounding), but blocks far below the tensor max hit the `2^-6` clamp: their scale is then too
large, so their elements land low on the E2M1 grid (or flush to zero) and lose precision. The
sweep below keeps one block at amax 1 (so the tensor scale is fixed) and moves a second block's
amax down by up to 2^-20.
"""),
    ("code", """\
ratios = np.float32(2.0) ** -np.linspace(0, 20, 200, dtype=np.float32)
pattern = np.linspace(1.0, -0.2, 16, dtype=np.float32)
tensors = np.stack([np.stack([pattern, r * pattern]) for r in ratios])   # [200, 2 blocks, 16]


@jax.jit
def nvfp4_levels(x):
    q = lowbit.quantize(x, lowbit.NVFP4)
    return q.tensor_scale, q.scale.astype(jnp.float32)[:, 0], q.dequantize()


ts, block_scale, rel_err = [], [], []
for t in tensors:
    tensor_scale, scales, xhat = nvfp4_levels(jnp.asarray(t))
    ts.append(float(tensor_scale)); block_scale.append(float(scales[1]))
    rel_err.append(float(np.linalg.norm(xhat[1] - t[1]) / np.linalg.norm(t[1])))
ts, block_scale = np.array(ts), np.array(block_scale)
ideal = ratios / 6 / ts                                # (block_amax / 6) / tensor_scale before E4M3

fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(10, 3.6))
ax_s.loglog(ratios, ideal, "k:", label="ideal (block_amax/6)/ts")
ax_s.loglog(ratios, block_scale, label="stored E4M3 block scale")
ax_s.axhline(2.0**-6, color="r", linestyle="--", label="clamp 2^-6")
ax_s.set(xlabel="block amax / tensor amax", ylabel="block scale", title="NVFP4 block scale")
ax_e.loglog(ratios, rel_err)
ax_e.set(xlabel="block amax / tensor amax", ylabel="relative error of the block",
         title="error of the small block")
ax_s.legend(fontsize=8)
plt.show()
clamped = ratios[block_scale <= 2.0**-6 * 1.0001]
print(f"tensor scale = {ts[0]:.6g} (1/2688); the ideal block scale is 448 * block_amax / tensor_amax, so it "
      f"clamps at 2^-6 below a ratio of 2^-6/448 = {2**-6 / 448:.2e} (measured: {clamped.max():.2e})")
"""),
    ("md", """\
## Error vs block size

SQNR = 10 log10(sum x^2 / sum (x - qdq(x))^2) of standard normal data, with other block sizes
emulated by `dataclasses.replace(lowbit.MXFP4, block_size=b)` (the quantizer reads the block
size from the `Format`).
"""),
    ("code", """\
def sqnr_db(x, xhat) -> float:
    x, xhat = np.asarray(x, np.float64), np.asarray(xhat, np.float64)
    return float(10 * np.log10(np.sum(x**2) / np.sum((x - xhat) ** 2)))


def row_rel_err(x, xhat) -> float:
    \"\"\"Mean over rows (tokens) of |x_row - xhat_row| / |x_row|: every token counts, small or large.\"\"\"
    x, xhat = np.asarray(x, np.float64), np.asarray(xhat, np.float64)
    return float(np.mean(np.linalg.norm(x - xhat, axis=-1) / np.linalg.norm(x, axis=-1)))


@functools.partial(jax.jit, static_argnames=("fmt", "scale_mode"))
def qdq(x, fmt, scale_mode="floor"):
    return lowbit.qdq(x, fmt, scale_mode=scale_mode)


x_normal = jax.random.normal(jax.random.key(0), (128, 1024), jnp.float32)
BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
VARIANTS = {"MXFP4 floor": (lowbit.MXFP4, "floor"), "MXFP4 rceil": (lowbit.MXFP4, "rceil"),
            "NVFP4": (lowbit.NVFP4, "floor"), "MXFP8 floor": (lowbit.MXFP8, "floor")}
by_block = {name: [sqnr_db(x_normal, qdq(x_normal, dataclasses.replace(fmt, block_size=b), mode))
                   for b in BLOCK_SIZES] for name, (fmt, mode) in VARIANTS.items()}

fig, ax = plt.subplots()
for name, values in by_block.items():
    ax.plot(BLOCK_SIZES, values, "o-", label=name)
ax.set(xscale="log", xlabel="block size", ylabel="SQNR (dB)", title="normal data: SQNR vs block size")
ax.set_xticks(BLOCK_SIZES, [str(b) for b in BLOCK_SIZES])
ax.legend()
plt.show()
print("block".ljust(14) + "".join(f"{b:>8}" for b in BLOCK_SIZES))
for name, values in by_block.items():
    print(name.ljust(14) + "".join(f"{v:8.2f}" for v in values))
"""),
    ("md", """\
On Gaussian data the curves move by only 1-2 dB over a 32x range of block sizes: E2M1's grid is
roughly logarithmic, so most of the error is relative to each value. Smaller blocks help NVFP4 and
MXFP4-RCEIL (each block's max sits nearer the top of the grid); FLOOR trades the other way, since
its clipping of the block max (up to 25%, above) hits small blocks more often, while a large
block's max is one element among many. The two MX rules cross near the standard block of 32.

## Error vs distribution

Standard normal, Student-t (3 degrees of freedom), lognormal (random signs), normal with 0.5%
outliers of 30x, and normal rows scaled by 2^u with u uniform in [-12, 12] (a wide dynamic range
across tokens), each 128 x 1024, blocks along the last axis.
"""),
    ("code", """\
keys = jax.random.split(jax.random.key(1), 5)
shape = (128, 1024)
outlier_mask = jax.random.bernoulli(keys[3], 0.005, shape)
signs = jnp.where(jax.random.bernoulli(keys[2], 0.5, shape), 1.0, -1.0)
DISTRIBUTIONS = {
    "normal": x_normal,
    "student-t(3)": jax.random.t(keys[0], 3.0, shape),
    "lognormal": signs * jnp.exp(jax.random.normal(keys[1], shape)),
    "normal+outliers": jnp.where(outlier_mask, 30.0, 1.0) * x_normal,
    "row-scales-2^±12": 2.0 ** jax.random.uniform(keys[4], (shape[0], 1), minval=-12, maxval=12) * x_normal,
}
FORMATS = {"FP8-tensor": (lowbit.FP8, "floor"), "MXFP8": (lowbit.MXFP8, "floor"),
           "MXFP8-rceil": (lowbit.MXFP8, "rceil"), "MXFP6-E2M3": (lowbit.MXFP6_E2M3, "floor"),
           "MXFP4": (lowbit.MXFP4, "floor"), "NVFP4": (lowbit.NVFP4, "floor")}
table = {(d, f): (sqnr_db(x, xhat := qdq(x, fmt, mode)), row_rel_err(x, xhat))
         for f, (fmt, mode) in FORMATS.items() for d, x in DISTRIBUTIONS.items()}

fig, ax = plt.subplots(figsize=(10, 3.6))
width = 0.8 / len(FORMATS)
for i, f in enumerate(FORMATS):
    ax.bar(np.arange(len(DISTRIBUTIONS)) + i * width, [table[d, f][0] for d in DISTRIBUTIONS], width, label=f)
ax.set_xticks(np.arange(len(DISTRIBUTIONS)) + 0.4 - width / 2, list(DISTRIBUTIONS))
ax.set(ylabel="SQNR (dB)", title="SQNR by format and distribution")
ax.legend(fontsize=8, ncol=3)
plt.show()
"""),
    ("code", """\
print("SUMMARY: SQNR in dB over the tensor (mean per-row relative error)")
print("format".ljust(12) + "".join(d.rjust(19) for d in DISTRIBUTIONS))
for f in FORMATS:
    cells = (f"{table[d, f][0]:.2f} ({table[d, f][1]:.2%})" for d in DISTRIBUTIONS)
    print(f.ljust(12) + "".join(c.rjust(19) for c in cells))
"""),
    ("md", """\
Reading the table:
* **SQNR over the tensor** is dominated by its largest values; the **per-row error** shows what
  happens to every token. Per-tensor FP8 matches the block formats until the rows span 2^±12:
  then the small rows fall below E4M3's range and are lost (about 30% mean row error), while
  MX blocks each get their own power-of-two scale and do not notice.
* **FLOOR vs RCEIL for MXFP8**: FLOOR clips the block max when it lands in (448, 512) and loses
  1-3 dB on heavy tails; RCEIL never clips and stays at E4M3's ~31.5 dB. MXFP6 E2M3 has the same
  3 mantissa bits as E4M3 and, on this data, the same error as MXFP8-FLOOR.
* **FP4**: NVFP4's 16-element blocks with an E4M3 (non-power-of-two) scale beat MXFP4 by 2-6 dB
  and are even helped by isolated outliers (the other blocks keep fine scales). Its block scale
  spans only 2^-6..448 relative to the tensor scale, so rows 2^24 apart lose the small ones, as the
  two-level sweep above predicted. Outliers inside a block cost every format: notebook 2 spreads
  them with a Hadamard transform.
"""),
]

SR_HADAMARD_NB = [
    ("md", """\
# 2. Stochastic rounding and the random Hadamard transform

**Stochastic rounding** (SR) rounds x up to the next grid point with probability equal to its
fractional distance p from the lower one, so E[q(x)] = x (unbiased) at the price of variance
p(1-p) ulp^2. **The random Hadamard transform** (RHT) multiplies blocks of the contraction axis
by an orthonormal H·diag(s): a GEMM is unchanged, (A H S)(S Hᵀ B) = A·B, but a single outlier is
spread over its whole block, so the shared scale wastes fewer bits.
"""),
    ("code", SETUP + """\
import functools

import jax
import jax.numpy as jnp
import numpy as np

import lowbit
"""),
    ("md", """\
## SR: bias and variance between two grid points

Values between the E2M1 grid points 2 and 3 (ulp 1), quantized with MXFP4: each block of 32 also
holds a 4.0 so that its shared exponent is 0 (`floor(log2 4) - 2`) and the elements are not
rescaled. RNE gives a deterministic error up to half an ulp; SR over 2000 keys averages to zero.
"""),
    ("code", """\
lo, hi = 2.0, 3.0
values = np.linspace(lo, hi, 41, dtype=np.float32)
block = np.full((len(values), 32), 4.0, np.float32)
block[:, 1:] = values[:, None]                                         # 31 copies per value
block = jnp.asarray(block)


@jax.jit
def sr_samples(keys):
    return jax.vmap(lambda k: lowbit.qdq(block, lowbit.MXFP4, rounding="stochastic", key=k)[:, 1:])(keys)


samples = np.asarray(sr_samples(jax.random.split(jax.random.key(0), 2000)), np.float64)  # [keys, 41, 31]
rne = np.asarray(lowbit.qdq(block, lowbit.MXFP4)[:, 1], np.float64)
n = samples.shape[0] * samples.shape[2]
sr_bias = samples.mean(axis=(0, 2)) - values
sr_var = samples.var(axis=(0, 2))
p = (values - lo) / (hi - lo)

fig, (ax_b, ax_v) = plt.subplots(1, 2, figsize=(10, 3.6))
ax_b.plot(values, rne - values, label="RNE error")
ax_b.plot(values, sr_bias, "o", markersize=3, label=f"SR mean error ({n} samples)")
ax_b.set(xlabel="x", ylabel="E[q(x)] - x", title="bias")
ax_v.plot(values, p * (1 - p), "k-", label="theory p(1-p) ulp^2")
ax_v.plot(values, sr_var, "o", markersize=3, label="SR measured")
ax_v.set(xlabel="x", ylabel="Var[q(x)]", title="variance")
ax_b.legend(fontsize=8, loc="upper left"); ax_v.legend(fontsize=8, loc="lower center")
plt.show()
se = np.sqrt(p * (1 - p) / n)                                          # standard error of the mean
print(f"max |RNE bias| = {np.max(np.abs(rne - values)):.3f} ulp; "
      f"max |SR bias| = {np.max(np.abs(sr_bias)):.4f} ulp "
      f"(at most {np.max(np.abs(sr_bias) / np.maximum(se, 1e-12)):.1f} standard errors)")
print(f"max |SR var - p(1-p)| = {np.max(np.abs(sr_var - p * (1 - p))):.4f} ulp^2")
neighbours = (samples == np.floor(values)[:, None]) | (samples == np.ceil(values)[:, None])
print("SR never moves more than one grid step:", bool(np.all(neighbours)))
"""),
    ("md", """\
Why unbiasedness matters: averaging many quantized copies of the same value (as a GEMM's
accumulation or a sum of small gradient updates does) keeps RNE's error, but SR's averages out.
"""),
    ("code", """\
x = jnp.full((2000, 32), 2.3, jnp.float32).at[:, 0].set(4.0)
sr_mean = float(lowbit.qdq(x, lowbit.MXFP4, rounding="stochastic", key=jax.random.key(7))[:, 1:].mean())
rne_mean = float(lowbit.qdq(x, lowbit.MXFP4)[:, 1:].mean())
print(f"mean of quantized 2.3: RNE {rne_mean:.4f}, SR {sr_mean:.4f}")
"""),
    ("md", """\
## Outlier blocks before and after the RHT

Activations of LLMs have a few channels with much larger magnitude. Below: 256 tokens x 1024
channels, normal, with 8 channels scaled by 30. Per block of 32 channels we look at the crest
factor max|x| / rms(x): it is what the shared scale must cover. `lowbit.random_hadamard` applies
H_b·diag(s) to blocks of b channels with random signs s from a key.
"""),
    ("code", """\
key_x, key_w, key_c, key_s = jax.random.split(jax.random.key(1), 4)
tokens, channels = 256, 1024
outlier_channels = jax.random.choice(key_c, channels, (8,), replace=False)
channel_gain = jnp.ones(channels).at[outlier_channels].set(30.0)
x_act = jax.random.normal(key_x, (tokens, channels)) * channel_gain


def crest(x, block):
    xb = np.asarray(x, np.float64).reshape(x.shape[0], -1, block)
    return (np.abs(xb).max(-1) / np.sqrt((xb**2).mean(-1))).ravel()


x_rht32 = lowbit.random_hadamard(x_act, key_s, axis=-1, block=32)
x_rht16 = lowbit.random_hadamard(x_act, key_s, axis=-1, block=16)
print(f"the transform is orthonormal: |x| = {float(jnp.linalg.norm(x_act)):.2f}, "
      f"|Hx| = {float(jnp.linalg.norm(x_rht32)):.2f}")

fig, ax = plt.subplots()
bins = np.linspace(1, 6, 60)
ax.hist(crest(x_act, 32), bins, alpha=0.6, label="original")
ax.hist(crest(x_rht32, 32), bins, alpha=0.6, label="after RHT (b=32)")
ax.set(yscale="log", xlabel="block max / block rms (block 32)", ylabel="blocks", title="crest factor")
ax.legend()
plt.show()
print(f"crest factor, blocks of 32: max {crest(x_act, 32).max():.2f} -> {crest(x_rht32, 32).max():.2f}; "
      f"99th pct {np.percentile(crest(x_act, 32), 99):.2f} -> {np.percentile(crest(x_rht32, 32), 99):.2f} "
      f"(sqrt(32) = {np.sqrt(32):.2f} is the most a block of 32 can have)")
"""),
    ("md", """\
SQNR of quantize-dequantize with and without the RHT. The transform is orthonormal, so the error
measured in the rotated space equals the error after rotating back.
"""),
    ("code", """\
def sqnr_db(x, xhat) -> float:
    x, xhat = np.asarray(x, np.float64), np.asarray(xhat, np.float64)
    return float(10 * np.log10(np.sum(x**2) / np.sum((x - xhat) ** 2)))


@functools.partial(jax.jit, static_argnames=("fmt", "axis"))
def qdq(x, fmt, axis=-1):
    return lowbit.qdq(x, fmt, axis=axis)


FORMATS = {"MXFP4": (lowbit.MXFP4, 32), "NVFP4": (lowbit.NVFP4, 16), "MXFP8": (lowbit.MXFP8, 32)}
x_clean = jax.random.normal(key_x, (tokens, channels))
print(f"{'format':<8}{'RHT block':>10}{'normal':>10}{'outliers':>10}{'outliers+RHT':>14}")
for name, (fmt, b) in FORMATS.items():
    rot = lowbit.random_hadamard(x_act, key_s, axis=-1, block=b)
    print(f"{name:<8}{b:>10}{sqnr_db(x_clean, qdq(x_clean, fmt)):10.2f}"
          f"{sqnr_db(x_act, qdq(x_act, fmt)):10.2f}{sqnr_db(rot, qdq(rot, fmt)):14.2f}")
"""),
    ("md", """\
## GEMM error with both operands quantized

Y = A·B with B normal weights (1024 x 512) and A either the channel-outlier activations above or
heavy-tailed Student-t(3) activations (256 x 1024), both operands quantized along the contraction
axis K (A along its last axis, B along its first). With the RHT, the *same* signs transform A's
rows and B's columns, so A'B' = AB before quantization.
"""),
    ("code", """\
b_w = jax.random.normal(key_w, (channels, 512)) / np.sqrt(channels)
ACTIVATIONS = {"outliers": x_act, "student-t": jax.random.t(jax.random.key(5), 3.0, (tokens, channels))}


def gemm_rel_err(a, fmt, rht_block=None):
    y_exact = np.asarray(a, np.float64) @ np.asarray(b_w, np.float64)
    lhs, rhs = a, b_w
    if rht_block:
        lhs = lowbit.random_hadamard(lhs, key_s, axis=-1, block=rht_block)
        rhs = lowbit.random_hadamard(rhs, key_s, axis=0, block=rht_block)
    if fmt is not None:
        lhs, rhs = qdq(lhs, fmt, axis=-1), qdq(rhs, fmt, axis=0)
    y = np.asarray(lhs, np.float64) @ np.asarray(rhs, np.float64)
    return float(np.linalg.norm(y - y_exact) / np.linalg.norm(y_exact))


print(f"RHT alone (no quantization) changes A·B by {gemm_rel_err(x_act, None, 32):.1e} (float32 round-off)")
gemm = {(data, name): (gemm_rel_err(a, fmt), gemm_rel_err(a, fmt, b))
        for data, a in ACTIVATIONS.items() for name, (fmt, b) in FORMATS.items()}
fig, ax = plt.subplots(figsize=(9, 3.6))
positions = np.arange(len(gemm))
ax.bar(positions - 0.2, [v[0] for v in gemm.values()], 0.4, label="no RHT")
ax.bar(positions + 0.2, [v[1] for v in gemm.values()], 0.4, label="RHT")
ax.set_xticks(positions, [f"{name}\\n{data}" for data, name in gemm])
ax.set(yscale="log", ylabel="|Y_q - Y| / |Y|", title="GEMM error, both operands quantized")
ax.legend()
plt.show()
"""),
    ("code", """\
print("SUMMARY: GEMM relative error (activations x normal weights)")
print(f"{'format':<8}{'activations':<12}{'no RHT':>10}{'RHT':>10}{'gain':>8}")
for (data, name), (plain, rotated) in gemm.items():
    print(f"{name:<8}{data:<12}{plain:10.4f}{rotated:10.4f}{plain / rotated:7.2f}x")
"""),
    ("md", """\
What the numbers say:
* **The RHT Gaussianises blocks.** Heavy tails and outliers become near-normal blocks with crest
  factors around 3 instead of sqrt(b). That is what MXFP4 needs: its power-of-two scale and
  32-element blocks are hurt most by outliers, and the RHT gives back most of the loss. MXFP8
  gains a little.
* **NVFP4 gains little or loses.** Its 16-element blocks and E4M3 scales already isolate an outlier
  in a block of its own, where the outlier itself is stored almost exactly; after the transform the
  outlier's energy is spread over 16 values near the top of the E2M1 grid, whose binade [4, 6]
  has only two points. NVIDIA's recipe (arXiv 2509.25149, sec. 4.2) likewise applies the RHT
  only to the inputs of the wgrad GEMM (contraction over tokens), not to fprop or dgrad.
"""),
]

DROP_IN_NB = [
    ("md", """\
# 3. Drop-in: quantize an existing Flax NNX model

The model below is plain Flax: it knows nothing about lowbit. `lowbit.quantize_model(model, recipe)`
walks its graph and swaps every GEMM hook (`nnx.Linear.dot_general`, `nnx.Einsum.einsum_op`,
expert `ragged_dot`) for a quantized one whose forward (fprop) and backward GEMMs (dgrad, wgrad)
follow the recipe. Recipes with stochastic rounding or a random Hadamard transform draw fresh
keys from an NNX RNG stream named `quant`.
"""),
    ("code", SETUP + """\
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowbit
from lowbit.nn import conversion_report
"""),
    ("md", "## A plain NNX model and a synthetic task (teacher-student regression)"),
    ("code", """\
class MLP(nnx.Module):
    \"\"\"2-layer GELU MLP with a bf16 compute dtype and float32 master weights.\"\"\"

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(d_in, d_hidden, dtype=jnp.bfloat16, rngs=rngs)
        self.out = nnx.Linear(d_hidden, d_out, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(x)))


D_IN, D_HIDDEN, D_OUT, BATCH, STEPS = 64, 256, 32, 128, 60
teacher = MLP(D_IN, 128, D_OUT, rngs=nnx.Rngs(params=100))


def batch_at(step: int):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (BATCH, D_IN))
    return x, teacher(x).astype(jnp.float32)
"""),
    ("md", """\
## Convert: one call

`quantize_model` works in place and returns the model. `conversion_report` lists every hook and
the recipe that runs it. The `nvfp4` recipe uses SR on gradients and an RHT on the wgrad inputs,
so its model needs `rngs` with a `quant` stream.
"""),
    ("code", """\
def make_model(recipe: str | None):
    rngs = nnx.Rngs(params=0, quant=1)                # same initial weights for every recipe
    model = MLP(D_IN, D_HIDDEN, D_OUT, rngs=rngs)
    if recipe is not None:
        model = lowbit.quantize_model(model, lowbit.get_recipe(recipe), rngs=rngs)
    return model


models = {"bf16": make_model(None), "mxfp8": make_model("mxfp8"), "nvfp4": make_model("nvfp4")}
for name, model in models.items():
    for hook in conversion_report(model):
        print(f"{name:>6}: {hook.path:<8} {hook.attribute:<12} -> {hook.recipe or 'high precision'}")
nvfp4 = lowbit.get_recipe("nvfp4")
print(f"\\n{type(models['nvfp4'].hidden.dot_general).__name__} running {nvfp4.name!r}:")
for gemm in ("fprop", "dgrad", "wgrad"):
    print(f"  {gemm}: {getattr(nvfp4, gemm)}")
"""),
    ("md", "## Train each copy for a few dozen AdamW steps"),
    ("code", """\
def loss_fn(model, x, y):
    return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


curves = {}
for name, model in models.items():
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    start, losses = time.perf_counter(), []
    for step in range(STEPS):
        losses.append(float(train_step(model, optimizer, *batch_at(step))))
    curves[name] = np.array(losses)
    print(f"{name:>6}: {time.perf_counter() - start:5.1f} s (incl. compile), final loss {losses[-1]:.4f}")

fig, ax = plt.subplots()
for name, losses in curves.items():
    ax.plot(losses, label=name)
ax.set(yscale="log", xlabel="step", ylabel="MSE", title="same model, same data, three recipes")
ax.legend()
plt.show()
"""),
    ("md", """\
All three start from the same weights and see the same batches. MXFP8 (8-bit elements, blocks of
32) follows the bf16 curve closely; NVFP4 (4-bit elements in all three GEMMs of both layers) trails
by a few percent on this small model. NVIDIA's recipe keeps the first and last few layers of a
large model in BF16 (`keep_last_fraction`, `high_precision_rules`); here every GEMM is FP4.
"""),
    ("md", """\
## Or pick the GEMM per layer by hand

`lowbit.dot_general(recipe)` has `jax.lax.dot_general`'s signature, so it plugs into any layer
that takes a `dot_general` (for SR/RHT recipes pass `lowbit.nn.QuantDotGeneral(recipe, rngs=rngs)`,
which draws the keys). Forward and gradients stay close to the unquantized layer:
"""),
    ("code", """\
layer_q = nnx.Linear(D_IN, D_HIDDEN, dot_general=lowbit.dot_general("mxfp8"), rngs=nnx.Rngs(0))
layer_f = nnx.Linear(D_IN, D_HIDDEN, rngs=nnx.Rngs(0))
x, _ = batch_at(0)


def grad_kernel(layer):
    return nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x))))(layer).kernel[...]


rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
fwd_err, grad_err = rel(layer_q(x), layer_f(x)), rel(grad_kernel(layer_q), grad_kernel(layer_f))
print(f"mxfp8 Linear vs float32 Linear: forward rel. error {fwd_err:.4f}, "
      f"kernel-gradient rel. error {grad_err:.4f}")
"""),
    ("code", """\
print("SUMMARY: first loss, final loss (mean of the last 10 steps) and its gap to bf16")
print(f"{'recipe':<8}{'first':>9}{'final':>9}{'gap':>9}")
base = curves["bf16"][-10:].mean()
for name, losses in curves.items():
    final = losses[-10:].mean()
    print(f"{name:<8}{losses[0]:9.4f}{final:9.4f}{100 * (final - base) / base:+8.2f}%")
"""),
]

CONVERGENCE_NB = [
    ("md", """\
# 4. Convergence: loss curves per recipe

Reads run directories (each with the `metrics.jsonl` that `lowbit.train` writes) and plots train and
validation loss per recipe and the relative gap to the bf16 run.

`RUN_ROOT` is a directory whose subdirectories are runs: the `--workdir` of
`python -m lowbit.study`, or the study committed under `docs/convergence/`. Leave it `None` to use
`docs/convergence/` when it holds runs. Where no runs are found, the notebook trains a small study
itself with `lowbit.study.run_study` (a 1-layer dense variant of the `tiny` config, bf16 and
mxfp8, 20 steps, under a minute on a CPU) into `RUN_ROOT` or a temporary directory.
"""),
    ("code", """\
RUN_ROOT = None          # path to a directory of run directories, or None
FRESH_RECIPES = ("bf16", "mxfp8")
FRESH_OVERRIDES = ["steps=20", "max_target_length=32", "num_decoder_layers=1", "num_experts=0",
                   "learning_rate=1e-2", "warmup_steps=5", "eval_every=10", "eval_batches=1",
                   "checkpoint_every=0"]
""", ["parameters"]),
    ("code", SETUP + """\
import tempfile
import warnings
from pathlib import Path

from lowbit.plot import read_metrics, smooth
from lowbit.study import TAIL, final_losses
"""),
    ("code", """\
def find_runs(root) -> dict[str, Path]:
    \"\"\"{recipe name: run dir} for every subdirectory of `root` holding a metrics.jsonl.\"\"\"
    runs = {}
    for metrics in sorted(Path(root).glob("*/metrics.jsonl")):
        run_dir = metrics.parent
        recipe_file = run_dir / "recipe.yaml"
        name = run_dir.name
        if recipe_file.is_file():
            for line in recipe_file.read_text().splitlines():
                if line.startswith("name:"):
                    name = line.split(":", 1)[1].strip()
                    break
        runs[name if name not in runs else run_dir.name] = run_dir
    return runs


def default_root():
    for candidate in (Path.cwd() / "docs" / "convergence", Path.cwd().parent / "docs" / "convergence"):
        if find_runs(candidate):
            return candidate
    return None


root = Path(RUN_ROOT) if RUN_ROOT is not None else default_root()
if root is None or not find_runs(root):
    from lowbit.config import load_config
    from lowbit.study import run_study

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    root = root or Path(tempfile.mkdtemp(prefix="lowbit-convergence-"))
    print(f"no runs found; training {FRESH_RECIPES} into {root}")
    run_study(load_config("tiny", FRESH_OVERRIDES), FRESH_RECIPES, root)
    # run_study draws root/curves.png through lowbit.plot, which selects matplotlib's Agg backend
    # for the whole process; switch the notebook's inline figures back on.
    get_ipython().run_line_magic("matplotlib", "inline")  # noqa: F821 (IPython global)
runs = find_runs(root)
print(f"{len(runs)} runs in {root}: {', '.join(runs)}")
"""),
    ("code", """\
metrics = {name: read_metrics(run_dir) for name, run_dir in runs.items()}
fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 3.8))
for i, (name, (train_rows, val_rows)) in enumerate(metrics.items()):
    steps = [r["step"] for r in train_rows]
    loss = [r["loss"] for r in train_rows]
    ax_t.plot(steps, loss, color=f"C{i}", alpha=0.2)
    ax_t.plot(steps, smooth(loss, 0.8), color=f"C{i}", label=name)
    if val_rows:
        ax_v.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-",
                  color=f"C{i}", label=name)
ax_t.set(xlabel="step", ylabel="train loss (EMA 0.8)", title="train loss")
ax_v.set(xlabel="step", ylabel="val loss", title="validation loss")
ax_t.legend(fontsize=8); ax_v.legend(fontsize=8)
plt.show()
"""),
    ("md", """\
## Gap to bf16

(loss_recipe - loss_bf16) / loss_bf16 at the same step, on the smoothed train loss (curve) and,
as in `lowbit.study`'s summary, on the mean of the last `TAIL` train losses and on the last
validation loss (table). Recipes share the seed and the data order, so at step t every run has
seen the same batches: the gap measures the quantization alone.
"""),
    ("code", """\
reference = "bf16" if "bf16" in metrics else next(iter(metrics))


def smoothed_by_step(train_rows):
    return dict(zip([r["step"] for r in train_rows], smooth([r["loss"] for r in train_rows], 0.8),
                    strict=True))


ref_smooth = smoothed_by_step(metrics[reference][0])
fig, ax = plt.subplots()
for i, (name, (train_rows, _)) in enumerate(metrics.items()):
    if name != reference:
        mine = smoothed_by_step(train_rows)
        common = sorted(set(mine) & set(ref_smooth))
        ax.plot(common, [100 * (mine[s] - ref_smooth[s]) / ref_smooth[s] for s in common],
                color=f"C{i}", label=name)
ax.axhline(0, color="k", linewidth=0.8)
ax.set(xlabel="step", ylabel=f"gap to {reference} (%)", title="relative train-loss gap (EMA 0.8)")
ax.legend(fontsize=8)
plt.show()
"""),
    ("code", """\
def finals(train_rows, val_rows, last_step):
    \"\"\"lowbit.study.final_losses (means of the last TAIL train losses, last val loss), NaN if no val.\"\"\"
    train, val = final_losses(train_rows, val_rows, last_step)
    return train, (float("nan") if val is None else val)


# A run that stopped early (a partial study) is compared with the reference at its own last step,
# never its early loss with the reference's final one.
ref_last = metrics[reference][0][-1]["step"]
print(f"SUMMARY: train loss (mean of the last {TAIL} logged), val loss and gap to {reference}, "
      "at the last step both runs reached")
print(f"{'recipe':<16}{'steps':>7}{'train':>9}{'val':>9}{'train gap':>11}{'val gap':>10}")
for name, (train_rows, val_rows) in metrics.items():
    last = min(train_rows[-1]["step"], ref_last)
    final_train, final_val = finals(train_rows, val_rows, last)
    ref_train, ref_val = finals(*metrics[reference], last)
    train_gap, val_gap = (final_train - ref_train) / ref_train, (final_val - ref_val) / ref_val
    partial = "  (stopped early)" if train_rows[-1]["step"] < ref_last else ""
    print(f"{name:<16}{last:>7}{final_train:9.4f}{final_val:9.4f}"
          f"{100 * train_gap:+10.2f}%{100 * val_gap:+9.2f}%{partial}")
"""),
]

NOTEBOOKS = {
    "01_formats.ipynb": FORMATS_NB,
    "02_sr_and_hadamard.ipynb": SR_HADAMARD_NB,
    "03_drop_in.ipynb": DROP_IN_NB,
    "04_convergence.ipynb": CONVERGENCE_NB,
}


def build(cells: list[tuple]) -> nbformat.NotebookNode:
    """A notebook (outputs empty) from (kind, source[, tags]) tuples."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for index, (kind, source, *tags) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source.rstrip("\n"))
        cell["id"] = f"cell-{index:02d}"  # stable ids keep regenerated files diff-free
        if tags:
            cell.metadata["tags"] = list(tags[0])
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else HERE
    for filename, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), out_dir / filename)
        print(out_dir / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
