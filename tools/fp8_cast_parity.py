"""On the GPU: the per-tensor FP8 cast(+transpose) kernel against lowbit.quantize, and lowbit.dot's fp8
GEMMs with the kernel ("auto") against the XLA quantize ("xla").

Run on the GPU machine:  python tools/fp8_cast_parity.py [--json FILE]
Rows: (1) kernel bits == XLA bits in both layouts, for each encoder (integer RNE, the GPU's convert),
for batched [..., M, N] shapes (the MoE's expert operands), edge values (zeros, subnormals,
power-of-two amax), a NaN-poisoned tensor, and every FP8 midpoint +-1 float32 ulp against ml_dtypes; (2) fp8
fwd+bwd: y, dX, dW of "auto" vs "xla" (mismatching elements and max relative difference), with a count
of the cast kernels in the compiled HLO (3 expected: X, W, dY); (3) delayed scaling: fp8_cast_scaled
against lowbit.scaling.quantize_scaled (bits, amax, scale) at a scale that fits and one that saturates,
and fp8-delayed fwd+bwd+history "auto" vs "xla". Exit 1 if a kernel's bits differ or
the kernel did not run. --size tiny: small shapes in Pallas interpret mode (switch "fused"), for the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import lowbit
from lowbit.kernels import quantize_fused, quantize_impl
from lowbit.kernels.fp8_cast_pallas import fp8_cast, fp8_cast_scaled
from lowbit.scaling import init_history, quantize_scaled, tensor_amax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.reference_np import fp8_midpoints  # noqa: E402

CAST_ENCODES = ("integer", "convert")  # the cast kernel's two encoders ("auto" picks one of them)

DIMS, BATCHED = (((1,), (0,)), ((), ())), (((2,), (1,)), ((0,), (0,)))
CAST_CASES = {"full": [((8, 2560, 4096), "fp8_e5m2", jnp.bfloat16), ((8, 4096, 2560), "fp8", jnp.bfloat16),
                       ((16384, 4096), "fp8", jnp.bfloat16), ((4, 48, 80), "fp8", jnp.float32)],
              "tiny": [((2, 32, 64), "fp8_e5m2", jnp.bfloat16), ((48, 80), "fp8", jnp.float32)]}
DOT_CASES = {"full": [((4096, 4096), (4096, 4096), DIMS), ((8, 1024, 2048), (8, 2048, 1024), BATCHED)],
             "tiny": [((2, 32, 64), (2, 64, 32), BATCHED)]}


def _bits(a) -> np.ndarray:
    a = np.asarray(jax.device_get(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _cast_input(shape, dtype, seed: int, poison: bool) -> jax.Array:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-10, 10, (*shape[:-1], 1)))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :6] = [0.0, -0.0, 1e-40, -3e-39, 2.0**12, -(2.0**12)]
    if poison:
        flat[1, 3] = np.nan
    return jnp.asarray(x, dtype)


def _cast_row(x, fmt: str, encode: str, case: str, want: np.ndarray | None = None) -> dict:
    """Kernel bits (both layouts) vs lowbit.quantize's (or `want`), and the tensor scale."""
    ref = lowbit.quantize(x, fmt)
    q, qt = jax.jit(lambda a: fp8_cast(a, fmt, transpose=True, encode=encode))(x)
    want = _bits(ref.data) if want is None else want
    bad = int((_bits(q.data) != want).sum() + (_bits(qt.data) != np.swapaxes(want, -1, -2)).sum())
    same_scale = bool(np.array_equal(_bits(q.tensor_scale), _bits(ref.tensor_scale)))
    return {"check": f"cast {encode}", "case": case, "mismatches": bad, "scale_equal": same_scale,
            "ok": bad == 0 and same_scale}


def cast_rows(size: str) -> list[dict]:
    rows = []
    for encode in CAST_ENCODES:
        for i, (shape, fmt, dtype) in enumerate(CAST_CASES[size]):
            for poison in (False, True):
                case = f"{'x'.join(map(str, shape))} {fmt} {jnp.dtype(dtype).name}{' NaN' if poison else ''}"
                rows.append(_cast_row(_cast_input(shape, dtype, i, poison), fmt, encode, case))
        for fmt, elem in (("fp8", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)):
            x = fp8_midpoints(elem)  # scale 1: the codes are ml_dtypes' RNE cast of x itself
            rows.append(_cast_row(jnp.asarray(x), fmt, encode, f"every {fmt} midpoint +-1 ulp",
                                  x.astype(elem).view(np.uint8)))
    return rows


def scaled_rows(size: str) -> list[dict]:
    """fp8_cast_scaled vs quantize_scaled: codes in both layouts, amax and scale, at the tensor's own
    scale / 8 (an amax history below the tensor's: values saturate) and x 4 (headroom)."""
    rows = []
    for encode in CAST_ENCODES:
        for i, (shape, fmt, dtype) in enumerate(CAST_CASES[size]):
            for poison in (False, True):
                x = _cast_input(shape, dtype, i, poison)
                own = lowbit.quantize(jnp.where(jnp.isfinite(x), x, 0), fmt).tensor_scale
                for factor in (0.125, 4.0):
                    scale = own * factor
                    ref, ref_amax = quantize_scaled(x, fmt, scale)
                    q, qt, amax = jax.jit(lambda a, s, f=fmt, e=encode: fp8_cast_scaled(
                        a, f, s, transpose=True, encode=e))(x, scale)
                    want = _bits(ref.data)
                    bad = int((_bits(q.data) != want).sum()
                              + (_bits(qt.data) != np.swapaxes(want, -1, -2)).sum())
                    same = bool(np.array_equal(_bits(q.tensor_scale), _bits(ref.tensor_scale))
                                and np.array_equal(_bits(amax), _bits(ref_amax)))
                    case = (f"{'x'.join(map(str, shape))} {fmt} {jnp.dtype(dtype).name} s x{factor:g}"
                            f"{' NaN' if poison else ''}")
                    rows.append({"check": f"scaled cast {encode}", "case": case, "mismatches": bad,
                                 "scale_equal": same, "ok": bad == 0 and same})
    return rows


def mx_kernel_rows() -> list[dict]:
    """The MX kernel's round-to-nearest encoders (FP8: convert, the default, and the magic add; E2M1: the
    magic add, the default, and midpoint compares) on every midpoint +-1 ulp, in blocks of 32 that each
    hold the element maximum (E8M0 scale 2^0): codes == ml_dtypes' RNE cast of the values."""
    rows = []
    e2m1 = ml_dtypes.float4_e2m1fn
    fp4_mags = np.unique(np.abs(np.arange(16, dtype=np.uint8).view(e2m1).astype(np.float32)))
    fp4_mid = ((fp4_mags[:-1].astype(np.float64) + fp4_mags[1:]) / 2).astype(np.float32)
    fp4_vals = np.concatenate([fp4_mid, np.nextafter(fp4_mid, np.float32(0)),
                               np.nextafter(fp4_mid, np.float32(9)), fp4_mags])
    cases = [("mxfp8", ml_dtypes.float8_e4m3fn, fp8_midpoints(ml_dtypes.float8_e4m3fn).ravel()),
             ("mxfp8_e5m2", ml_dtypes.float8_e5m2, fp8_midpoints(ml_dtypes.float8_e5m2).ravel()),
             ("mxfp4", e2m1, np.concatenate([fp4_vals, -fp4_vals]))]
    encoders = {"mxfp8": ("convert", "magic"), "mxfp8_e5m2": ("convert", "magic"),
                "mxfp4": ("magic", "threshold")}
    for (fmt, elem, vals), encode in [(case, e) for case in cases for e in encoders[case[0]]]:
        top = np.float32(np.abs(vals).max()) if elem is e2m1 else np.float32(ml_dtypes.finfo(elem).max)
        vals = vals[np.abs(vals) < top]
        blocks = np.resize(vals, (-(-vals.size // 31), 31))
        x = np.concatenate([np.full((blocks.shape[0], 1), top, np.float32), blocks], axis=1)
        x = np.resize(x, (-(-x.shape[0] // 16) * 16, 32)).reshape(-1, 64)
        q = jax.jit(lambda a, f=fmt, e=encode: quantize_fused(a, f, encode=e, fp4_layout="codes"))(
            jnp.asarray(x))
        got = np.asarray(q.data.astype(jnp.float32))
        want = x.astype(elem).astype(np.float32)
        bad = int((got != want).sum() + (np.signbit(got) != np.signbit(want)).sum())
        scale_ok = bool((np.asarray(q.scale).view(np.uint8) == 127).all())
        rows.append({"check": f"mx kernel {encode}", "case": f"every {fmt} midpoint +-1 ulp",
                     "mismatches": bad, "scale_equal": scale_ok, "ok": bad == 0 and scale_ok})
    return rows


def dot_rows(size: str, kernel_impl: str, recipe_name: str = "fp8") -> list[dict]:
    """fp8 fwd+bwd under `kernel_impl` vs "xla". float32 compute on the CPU: its dot runtime has no
    bfloat16 x bfloat16 -> float32 for the layout the interpret-mode kernel leads XLA to. A delayed
    recipe runs from a history of the operands' amaxes / 2 (so the casts saturate), and its next
    history is compared too."""
    rows = []
    recipe = lowbit.get_recipe(recipe_name)
    if jax.default_backend() == "cpu":
        recipe = dataclasses.replace(recipe, compute_dtype="float32")
    dg = lowbit.dot_general(recipe)
    for i, (lhs_shape, rhs_shape, dims) in enumerate(DOT_CASES[size]):
        keys = jax.random.split(jax.random.key(i), 3)
        out_shape = (*lhs_shape[:-1], rhs_shape[-1])
        x = jax.random.normal(keys[0], lhs_shape, jnp.bfloat16)
        w = (jax.random.normal(keys[1], rhs_shape, jnp.float32) / 64).astype(jnp.bfloat16)
        g = jax.random.normal(keys[2], out_shape, jnp.bfloat16)
        results, kernels = {}, {}
        history = None
        if recipe.delayed:
            amaxes = jnp.stack([tensor_amax(t)[0] for t in (x, w, g)]) / 2
            history = init_history(recipe.amax_history_len).at[:, 0].set(amaxes)
        for impl in ("xla", kernel_impl):
            def run(x, w, g, h, dims=dims):
                if h is None:
                    y, vjp = jax.vjp(lambda a, b: dg(a, b, dims, preferred_element_type=jnp.bfloat16), x, w)  # noqa: B023
                else:
                    y, vjp = jax.vjp(lambda a, b, c: dg(a, b, dims, preferred_element_type=jnp.bfloat16,  # noqa: B023
                                                        amax_history=c), x, w, h)
                return (y, *vjp(g))
            with quantize_impl(impl):
                compiled = jax.jit(run).lower(x, w, g, history).compile()
            kernels[impl] = compiled.as_text().count("lowbit_cast_")
            results[impl] = compiled(x, w, g, history)
        names = ("y", "dx", "dw", "history")
        for name, a, b in zip(names, results[kernel_impl], results["xla"], strict=False):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            rel = float(np.abs(a64 - b64).max() / max(np.abs(b64).max(), 1e-30))
            rows.append({"check": f"dot {recipe_name} {kernel_impl} vs xla",
                         "case": f"{lhs_shape}x{rhs_shape} {name}",
                         "mismatches": int((_bits(a) != _bits(b)).sum()), "max_rel_diff": rel,
                         "cast_kernels": kernels, "ok": kernels[kernel_impl] >= 3 and kernels["xla"] == 0})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--json", default="")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}", flush=True)
    kernel_impl = "auto" if jax.default_backend() == "gpu" else "fused"
    rows = (cast_rows(args.size) + scaled_rows(args.size) + mx_kernel_rows()
            + dot_rows(args.size, kernel_impl) + dot_rows(args.size, kernel_impl, "fp8-delayed"))
    for r in rows:
        extra = f"  max_rel_diff {r['max_rel_diff']:.2e}  {r['cast_kernels']}" if "max_rel_diff" in r else ""
        print(f"{r['check']:<28} {r['case']:<44} mismatches {r['mismatches']:>8}{extra}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
