"""Where the emulated MX/NVFP4 fwd+bwd spends its time: `python tools/profile_emulate.py` (H100, < 4 min).

For each recipe (bf16, mxfp8, nvfp4, mxfp4) at M x K x N (default 16384 x 4096 x 14336; x [M,K],
w [N,K] as stored, dy [M,N]) it times, as lowbit.dot_general's custom VJP does them:
  quantize  every operand quantization of the three GEMMs (X along K, W along K, W along N, dY along
            N, X along tokens, dY along tokens), RHT included, from the stored layout (transpose
            inside the jit, as in the real program) and, for the transposed ones, from a
            pre-transposed copy (what a materialised transpose would give);
  dequant   each quantized operand -> bf16 values as backends/emulate.split_scales makes them;
  gemm      each of the three GEMMs on pre-quantized operands through emulate.gemm (dequantize
            inside), the same with the dequantized operands behind an optimization barrier, and a
            plain bf16 TN GEMM of the same shape;
  fwd+bwd   the whole step through lowbit.dot_general for code variants (see VARIANTS) and, in a
            subprocess, with XLA's Triton GEMM fusion disabled (--xla_gpu_enable_triton_gemm=false).
Timing: N calls back to back, one block_until_ready, median over loops. Every row is wrapped (a
failure is recorded, the run goes on); a time budget stops starting new rows. Writes
$OUT/profile_emulate.json after every row and $OUT/hlo_<recipe>_<variant>.txt (optimized HLO of
the fwd+bwd) for mxfp8 and nvfp4; each fwd+bwd row also counts the HLO's GEMM kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowbit  # noqa: E402
from lowbit import dot as dot_mod  # noqa: E402
from lowbit.backends import emulate  # noqa: E402
from lowbit.recipes import get_recipe  # noqa: E402

BF16 = jnp.bfloat16
TN2 = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]
RECIPES = ("bf16", "mxfp8", "nvfp4", "mxfp4")
HLO_RECIPES = ("mxfp8", "nvfp4")
TRITON_OFF = "--xla_gpu_enable_triton_gemm=false"


# ----------------------------------------------------------------------------- code variants
_ORIG_SPLIT_SCALES = emulate.split_scales
_ORIG_QUANTIZE_OPERAND = dot_mod._quantize_operand


def _split_scales_barrier(op, compute_dtype):
    """emulate.split_scales with the dequantized values materialised (no fusion into the GEMM)."""
    values, outer = _ORIG_SPLIT_SCALES(op, compute_dtype)
    if isinstance(op, lowbit.QArray):
        values = lax.optimization_barrier(values)
    return values, outer


def _quantize_operand_barrier(a, cfg, key, axis, pad):
    """dot._quantize_operand on a materialised input (a transposed view becomes a real transpose)."""
    if cfg.quantized:
        a = lax.optimization_barrier(a)
    return _ORIG_QUANTIZE_OPERAND(a, cfg, key, axis, pad)


# name -> (patch emulate.split_scales?, patch dot._quantize_operand?)
VARIANTS = {
    "current": (False, False),
    "barrier_dequant": (True, False),
    "barrier_transpose": (False, True),
    "barrier_both": (True, True),
}


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """Swap the module functions for the variant while tracing and compiling."""
    dequant, transpose = VARIANTS[variant]
    try:
        if dequant:
            emulate.split_scales = _split_scales_barrier
        if transpose:
            dot_mod._quantize_operand = _quantize_operand_barrier
        yield
    finally:
        emulate.split_scales = _ORIG_SPLIT_SCALES
        dot_mod._quantize_operand = _ORIG_QUANTIZE_OPERAND


# ----------------------------------------------------------------------------- harness
def error_text(error: BaseException, limit: int = 3000) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2:]


def hlo_summary(hlo: str) -> dict[str, int]:
    """Counts of GEMM kernels and suspicious ops in an optimized HLO text."""
    return {
        "triton_gemm": len(re.findall(r'"kind":"__triton_gemm"', hlo)),
        "cublas": len(re.findall(r'custom_call_target="__cublas\$(?:gemm|lt\$matmul)"', hlo)),
        "cublas_f8": len(re.findall(r'custom_call_target="__cublas\$lt\$matmul\$f8"', hlo)),
        "dots": len(re.findall(r"\bdot\(", hlo)),
        "f32_dots": len(re.findall(r"= f32\[[^\]]*\]\{?[^ ]*\s+dot\(f32", hlo)),
        "fusions": len(re.findall(r"\bfusion\(", hlo)),
        "transposes": len(re.findall(r"\btranspose\(", hlo)),
        "opt_barriers": len(re.findall(r"opt-barrier", hlo)),
        "rng": len(re.findall(r"threefry|rng-bit-generator|cu_threefry", hlo)),
    }


def compile_fn(fn: Callable, args: tuple) -> tuple[Any, float, str, int]:
    """(executable, compile s, optimized HLO, optimization barriers in the lowered program)."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    barriers = lowered.as_text().count("optimization_barrier")
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    try:
        hlo = compiled.as_text() or ""
    except Exception:  # some backends do not expose it
        hlo = ""
    return compiled, seconds, hlo, barriers


def time_loops(compiled: Any, args: tuple, calls: int, loops: int) -> dict[str, float]:
    """Median / min ms per call over `loops` loops of `calls` back-to-back calls, one sync each."""
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    per_call = []
    for _ in range(loops):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = compiled(*args)  # one stream: the last result is ready only after all calls
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
        del out
    return {"ms": statistics.median(per_call) * 1e3, "min_ms": min(per_call) * 1e3}


class Profile:
    def __init__(self, args: argparse.Namespace):
        self.args, self.start, self.rows = args, time.monotonic(), []
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        device = jax.devices()[0]
        self.header = {"tool": "profile_emulate", "args": vars(args), "jax": jax.__version__,
                       "device": device.device_kind, "platform": device.platform}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write(self) -> None:
        data = {**self.header, "elapsed_s": round(self.elapsed(), 1), "rows": self.rows}
        (self.out_dir / "profile_emulate.json").write_text(json.dumps(data, indent=1, default=str))

    def run(self, row: dict[str, Any], fn: Callable, args: tuple, *, patch: str = "current",
            hlo_name: str | None = None, bytes_moved: float | None = None,
            flops: float | None = None) -> dict[str, Any]:
        """Compile fn under `patch`, time it, record one row (failures and budget skips included)."""
        if self.elapsed() > self.args.time_budget_s:
            row.update(status="skipped", error="time budget spent")
            self.rows.append(row)
            return row
        print(f"[{self.elapsed():6.1f}s] {row['recipe']:6s} {row['kind']:8s} {row['what']} ...", flush=True)
        try:
            with patched(patch):
                compiled, compile_s, hlo, barriers = compile_fn(fn, args)
            row.update(time_loops(compiled, args, self.args.calls, self.args.loops))
            row.update(compile_s=round(compile_s, 1), lowered_barriers=barriers, **hlo_summary(hlo))
            if bytes_moved:
                row["GB/s"] = bytes_moved / (row["ms"] * 1e-3) / 1e9
            if flops:
                row["TFLOP/s"] = flops / (row["ms"] * 1e-3) / 1e12
            if hlo_name and hlo:
                (self.out_dir / f"hlo_{hlo_name}.txt").write_text(hlo)
            row["status"] = "ok"
            del compiled
        except Exception as error:  # a failure is a result, never the end of the run
            row.update(status="error", error=error_text(error))
            traceback.print_exc(limit=4)
        print(f"[{self.elapsed():6.1f}s]   -> {row.get('ms', row.get('error', ''))}", flush=True)
        self.rows.append(row)
        self.write()
        return row

    def table(self) -> str:
        cols = ["recipe", "kind", "what", "ms", "min_ms", "GB/s", "TFLOP/s", "triton_gemm", "cublas",
                "transposes", "fusions", "lowered_barriers", "compile_s", "status", "error"]
        def cell(row, col):
            v = row.get(col, "")
            if col == "error" and v:
                v = str(v).splitlines()[0][:80]
            return f"{v:.3f}" if isinstance(v, float) else str(v)
        cols = [c for c in cols if any(c in r for r in self.rows)]
        width = {c: max([len(c)] + [len(cell(r, c)) for r in self.rows]) for c in cols}
        lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
        lines += ["  ".join(cell(r, c).ljust(width[c]) for c in cols) for r in self.rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the operands
def operand_specs(recipe_name: str) -> list[dict[str, Any]]:
    """Every quantization dot._qmatmul_fwd/_bwd performs for this recipe, in TN form [1, rows, K].

    source: which stored tensor (x [M,K], w [N,K], dy [M,N]); transposed: whether the TN operand is
    the transpose of the stored layout; reused: dot.py reuses another quantization instead.
    """
    r = get_recipe(recipe_name)
    specs = [
        ("X along K (fprop lhs)", "x", False, r.fprop, r.fprop.lhs, "fprop", 0, False),
        ("W along K (fprop rhs)", "w", False, r.fprop, r.fprop.rhs, "fprop", 1, False),
        ("W along N (dgrad rhs)", "w", True, r.dgrad, r.dgrad.rhs, "dgrad", 1,
         r.dgrad.rhs == r.fprop.rhs and dot_mod._reusable(r.fprop.rhs, r.fprop, r.dgrad)),
        ("X along M (wgrad lhs)", "x", True, r.wgrad, r.wgrad.lhs, "wgrad", 0,
         r.wgrad.lhs == r.fprop.lhs and dot_mod._reusable(r.fprop.lhs, r.fprop, r.wgrad)),
        ("dY along N (dgrad lhs)", "dy", False, r.dgrad, r.dgrad.lhs, "dgrad", 0, False),
        ("dY along M (wgrad rhs)", "dy", True, r.wgrad, r.wgrad.rhs, "wgrad", 1,
         r.wgrad.rhs == r.dgrad.lhs and dot_mod._reusable(r.dgrad.lhs, r.dgrad, r.wgrad)),
    ]
    out = []
    for name, source, transposed, pc, cfg, pass_name, slot, reused in specs:
        out.append(dict(name=name, source=source, transposed=transposed, pc=pc, cfg=cfg,
                        pass_name=pass_name, slot=slot, reused=reused))
    return out


def quantize_fn(spec: dict[str, Any]) -> Callable:
    """stored tensor (+ key) -> QArray (or bf16 array) exactly as dot.py builds that operand."""
    pc, cfg, slot = spec["pc"], spec["cfg"], spec["slot"]

    def fn(a, key, pre_transposed=False):
        a = a[None]
        if spec["transposed"] and not pre_transposed:
            a = jnp.swapaxes(a, 1, 2)
        keys = dot_mod._pass_keys(key, spec["pass_name"])
        a = a if pc.hadamard_block is None else dot_mod._rht_pair(pc, keys[2], a, a)[0]
        return dot_mod._quantize_operand(a, cfg, keys[slot], dot_mod._tn_axis(cfg), True)
    return fn


def gemm_pairs() -> list[tuple[str, int, int]]:
    """(pass, lhs spec index, rhs spec index) into operand_specs: the three TN GEMMs."""
    return [("fprop", 0, 1), ("dgrad", 4, 2), ("wgrad", 3, 5)]


# ----------------------------------------------------------------------------- profile steps
def profile_recipe(prof: Profile, recipe_name: str, data: dict[str, jax.Array], key: jax.Array,
                   m: int, k: int, n: int) -> None:
    from lowbit.bench_gemm import fwd_bwd_fn
    x, w, dy = data["x"], data["w"], data["dy"]
    flops = 6.0 * m * k * n
    backend = "-" if recipe_name == "bf16" else "emulate"
    variants = ["current"] if recipe_name == "bf16" else list(prof.args.variants)
    for variant in variants:
        hlo_name = f"{recipe_name}_{variant}" if recipe_name in HLO_RECIPES else None
        prof.run({"recipe": recipe_name, "kind": "fwd+bwd", "what": variant},
                 fwd_bwd_fn(recipe_name, backend), (x, w, dy, key), patch=variant,
                 hlo_name=hlo_name, flops=flops)
    if recipe_name == "bf16" or prof.args.skip_components:
        return

    specs = operand_specs(recipe_name)
    quantized: dict[int, Any] = {}
    for i, spec in enumerate(specs):
        if not spec["cfg"].quantized:
            quantized[i] = None  # a bf16 pass (mxfp4 fprop): no quantization, no emulated GEMM
            continue
        if spec["reused"]:  # dot.py transposes another operand's 2-D / per-tensor quantization
            prof.rows.append({"recipe": recipe_name, "kind": "quantize", "what": spec["name"],
                              "status": "reused (transposed QArray, no work)"})
            source = {2: 1, 3: 0, 5: 4}[i]
            quantized[i] = None if quantized.get(source) is None else dot_mod._swap_last(quantized[source])
            continue
        label = spec["name"]
        src = data[spec["source"]]
        nbytes = src.size * 2 + src.size * (get_bits(spec["cfg"]) / 8)
        fn = quantize_fn(spec)
        row = prof.run({"recipe": recipe_name, "kind": "quantize", "what": label},
                       fn, (src, key), bytes_moved=nbytes)
        if spec["transposed"] and spec["cfg"].quantized:
            src_t = data[spec["source"] + "_t"]
            prof.run({"recipe": recipe_name, "kind": "quantize", "what": label + " from pre-transposed"},
                     lambda a, kk, fn=fn: fn(a, kk, pre_transposed=True), (src_t, key), bytes_moved=nbytes)
        try:
            quantized[i] = jax.block_until_ready(jax.jit(fn)(src, key)) if row.get("status") == "ok" else None
        except Exception as error:
            print(f"  could not build operand {spec['name']}: {error_text(error, 300)}")
            quantized[i] = None

    for i, spec in enumerate(specs):
        q = quantized.get(i)
        if isinstance(q, lowbit.QArray):
            prof.run({"recipe": recipe_name, "kind": "dequant", "what": spec["name"]},
                     lambda qq: emulate.split_scales(qq, BF16)[0], (q,),
                     bytes_moved=q.data.size * (2 + get_bits(spec["cfg"]) / 8))

    for pass_name, li, ri in gemm_pairs():
        lhs, rhs = quantized.get(li), quantized.get(ri)
        if lhs is None or rhs is None:
            continue
        mm, kk = lhs.shape[1], lhs.shape[2]
        nn = rhs.shape[1]
        gflops = 2.0 * mm * kk * nn
        what = f"{pass_name} {mm}x{kk}x{nn}"
        # A fresh function per row: jax.jit caches traces by function identity, which would
        # silently reuse the unpatched program for the patched variant.
        prof.run({"recipe": recipe_name, "kind": "gemm", "what": what + " emulate.gemm"},
                 _emulate_gemm(), (lhs, rhs), flops=gflops)
        prof.run({"recipe": recipe_name, "kind": "gemm", "what": what + " emulate.gemm +barrier"},
                 _emulate_gemm(), (lhs, rhs), patch="barrier_dequant", flops=gflops)
        try:
            a = jax.jit(lambda q: emulate.split_scales(q, BF16)[0])(lhs)
            b = jax.jit(lambda q: emulate.split_scales(q, BF16)[0])(rhs)
            prof.run({"recipe": recipe_name, "kind": "gemm", "what": what + " bf16 on dequantized"},
                     lambda a, b: lax.dot_general(a, b, emulate.TN_DIMS, preferred_element_type=BF16),
                     (a, b), flops=gflops)
            del a, b
        except Exception as error:
            print(f"  bf16-on-dequantized skipped: {error_text(error, 300)}")
    quantized.clear()


def _emulate_gemm() -> Callable:
    return lambda a, b: emulate.gemm(a, b, out_dtype=BF16, compute_dtype=BF16)


def get_bits(cfg: Any) -> int:
    """Element bits of an operand config (16 for unquantized bf16)."""
    if not cfg.quantized:
        return 16
    return lowbit.get_format(cfg.format).elem_bits


def reference_rows(prof: Profile, data: dict[str, jax.Array], m: int, k: int, n: int) -> None:
    x, w, dy = data["x"], data["w"], data["dy"]
    prof.run({"recipe": "bf16", "kind": "gemm", "what": f"fprop TN {m}x{k}x{n}"},
             lambda a, b: lax.dot_general(a, b, TN2, preferred_element_type=BF16), (x, w),
             flops=2.0 * m * k * n)
    prof.run({"recipe": "-", "kind": "copy", "what": "dy * 1 (bf16 copy)"}, lambda a: a * 1, (dy,),
             bytes_moved=dy.size * 4)
    prof.run({"recipe": "-", "kind": "copy", "what": "transpose dy"}, lambda a: a.T + 0, (dy,),
             bytes_moved=dy.size * 4)
    prof.run({"recipe": "-", "kind": "copy", "what": "transpose x"}, lambda a: a.T + 0, (x,),
             bytes_moved=x.size * 4)


def triton_off_rows(prof: Profile, recipes: list[str]) -> None:
    """fwd+bwd (current code) in a subprocess with XLA's Triton GEMM fusion disabled."""
    budget_left = prof.args.time_budget_s - prof.elapsed()
    if budget_left < 30 or not recipes:
        prof.rows.append({"recipe": ",".join(recipes), "kind": "fwd+bwd", "what": "current " + TRITON_OFF,
                          "status": "skipped", "error": "time budget spent"})
        return
    sub_out = prof.out_dir / "triton_off"
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + TRITON_OFF).strip())
    cmd = [sys.executable, __file__, "--only-fwdbwd", "--variants", "current", "--recipes",
           ",".join(recipes), "--out", str(sub_out), "--calls", str(prof.args.calls), "--loops",
           str(prof.args.loops), "--shape", prof.args.shape, "--time-budget-s", str(budget_left - 10)]
    print(f"[{prof.elapsed():6.1f}s] subprocess: XLA_FLAGS+={TRITON_OFF} {' '.join(cmd[2:])}", flush=True)
    try:
        subprocess.run(cmd, env=env, timeout=max(budget_left, 30), check=False)
        sub = json.loads((sub_out / "profile_emulate.json").read_text())
        for row in sub["rows"]:
            row["what"] = row["what"] + " " + TRITON_OFF
            prof.rows.append(row)
    except Exception as error:
        prof.rows.append({"recipe": ",".join(recipes), "kind": "fwd+bwd", "what": "current " + TRITON_OFF,
                          "status": "error", "error": error_text(error)})
    prof.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16384x4096x14336", help="MxKxN")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"fwd+bwd code variants, comma list of {tuple(VARIANTS)}")
    parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per timed loop")
    parser.add_argument("--loops", type=int, default=5, help="timed loops (median reported)")
    parser.add_argument("--time-budget-s", type=float, default=200.0, help="no new rows after this")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder")
    parser.add_argument("--only-fwdbwd", action="store_true", help="fwd+bwd rows only")
    parser.add_argument("--skip-components", action="store_true", help="no quantize/dequant/gemm rows")
    parser.add_argument("--no-triton-off", action="store_true", help="skip the Triton-GEMM-off subprocess")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {tuple(VARIANTS)}")
    m, k, n = (int(v) for v in args.shape.lower().split("x"))
    recipes = [r for r in args.recipes.split(",") if r]

    prof = Profile(args)
    keys = jax.random.split(jax.random.key(1), 3)
    data = {"x": jax.random.normal(keys[0], (m, k), BF16),
            "w": (jax.random.normal(keys[1], (n, k), BF16) / math.sqrt(k)).astype(BF16),
            "dy": jax.random.normal(keys[2], (m, n), BF16)}
    key = jax.random.key(7)
    if args.only_fwdbwd:
        args.skip_components = True
    else:
        data.update({name + "_t": jnp.asarray(data[name].T) for name in ("x", "w", "dy")})
        jax.block_until_ready(data)
        reference_rows(prof, data, m, k, n)
    # fwd+bwd rows of every recipe first (the headline), then the components.
    for recipe_name in recipes:
        skip = args.skip_components
        args.skip_components = True
        profile_recipe(prof, recipe_name, data, key, m, k, n)
        args.skip_components = skip
    if not args.only_fwdbwd and not args.no_triton_off:
        triton_off_rows(prof, [r for r in recipes if r in ("bf16", "mxfp8", "nvfp4")])
    if not args.skip_components:
        for recipe_name in recipes:
            if recipe_name != "bf16":
                args_variants = args.variants
                args.variants = []
                profile_recipe(prof, recipe_name, data, key, m, k, n)
                args.variants = args_variants
    prof.write()
    print(prof.table())
    print(f"JSON and HLO in {prof.out_dir}  ({prof.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
