"""GEMM and grouped-GEMM (MoE) benchmarks per recipe: `python -m lowbit.bench_gemm {gemm,grouped}`.

gemm: one linear layer's three GEMMs (fprop, dgrad, wgrad = 6·M·K·N FLOPs) through
`lowbit.dot_general(recipe)` with quantization included, per recipe and backend, as TFLOP/s and
as a ratio to BF16 measured in the same run; reference rows: BF16 forward, raw FP8 E4M3 GEMM
(TN, bf16 out) and `jax.nn.scaled_dot_general` MXFP8/NVFP4 forward (2·M·K·N FLOPs).
grouped: MoE grouped GEMM of T tokens routed top-k to E experts with Zipf-like expert popularity:
dense GEMM of the same useful FLOPs, balanced batched GEMM, `lax.ragged_dot` (dropless
reference), capacity-padded batched GEMM (factor 1.25, drops overflow) and
`lowbit.grouped.grouped_matmul` (dropless chunk loops) and `lowbit.kernels.grouped_pallas` (dropless,
one Pallas launch; Triton on a GPU, interpret mode elsewhere), in BF16 and per-tensor FP8.

Every variant is wrapped: a failure is recorded verbatim and the next one runs; `--time-budget-s`
stops starting new variants; the table is printed at the end and JSON written after every row.
`--cache-dir` keeps XLA's compilation cache (FP8 GEMM autotuning costs 11-27 s per shape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit.kernels import triton_fp8_acc

BF16 = jnp.bfloat16
E4M3 = jnp.float8_e4m3fn
TN = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]: contracting dim last in both operands


# ----------------------------------------------------------------------------- harness
def enable_compilation_cache(directory: str | None) -> None:
    """Persistent XLA compilation cache in `directory` (every entry, however fast it compiled)."""
    if not directory:
        return
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def error_text(error: BaseException, limit: int = 4000) -> str:
    """The exception verbatim (type and message; head and tail kept if it is very long)."""
    text = f"{type(error).__name__}: {error}"
    if len(text) > limit:
        text = text[: limit // 2] + "\n...\n" + text[-limit // 2:]
    return text


def environment() -> dict[str, Any]:
    """Versions and device description for the JSON header."""
    device = jax.devices()[0]
    return {"jax": jax.__version__, "python": platform.python_version(), "platform": device.platform,
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "compute_capability": getattr(device, "compute_capability", None)}


def default_json(name: str) -> str:
    """$OUT/<name>.json on the device machine, else ./<name>.json."""
    return str(Path(os.environ.get("OUT", ".")) / f"{name}.json")


class Runner:
    """Runs benchmark variants under a time budget; one row per variant, failures kept verbatim."""

    def __init__(self, name: str, json_path: str | None, time_budget_s: float, args: dict[str, Any]):
        self.name, self.json_path, self.budget = name, json_path, time_budget_s
        self.start = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.header = {"benchmark": name, "args": args, "environment": environment()}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, row: dict[str, Any], measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """Append `row` updated with measure(*args)'s results, or with the error / budget skip."""
        if self.elapsed() > self.budget:
            row.update(status="skipped", error=f"time budget of {self.budget:.0f} s spent")
        else:
            label = " ".join(str(v) for v in row.values())
            print(f"[{self.elapsed():7.1f}s] {label} ...", flush=True)
            try:
                row.update(measure(*args))
                row["status"] = "ok"
            except Exception as error:  # every failure is a result, never the end of the run
                row.update(status="error", error=error_text(error))
                traceback.print_exc(limit=3)
            shown = {k: v for k, v in row.items() if k in ("ms", "tflops", "ratio", "error", "compile_s")}
            print(f"[{self.elapsed():7.1f}s]   -> {shown}", flush=True)
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> None:
        if not self.json_path:
            return
        path = Path(self.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.header, "elapsed_s": round(self.elapsed(), 1), "rows": self.rows}
        path.write_text(json.dumps(data, indent=1, default=str))

    def table(self, columns: Sequence[str]) -> str:
        """Fixed-width text table of all rows (errors shown by their first line)."""
        def cell(row, col):
            value = row.get(col, "")
            if col == "error" and value:
                value = str(value).splitlines()[0][:90]
            if isinstance(value, float):
                value = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
            return str(value)
        cols = [c for c in columns if any(c in r for r in self.rows)]
        widths = {c: max([len(c)] + [len(cell(r, c)) for r in self.rows]) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
        lines.append("  ".join("-" * widths[c] for c in cols))
        lines += ["  ".join(cell(r, c).ljust(widths[c]) for c in cols) for r in self.rows]
        return "\n".join(lines)


def compile_jit(fn: Callable, args: Sequence[Any]) -> tuple[Any, float, str]:
    """(compiled executable, compile seconds, optimized HLO text) of jax.jit(fn) on `args`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    try:
        hlo = compiled.as_text() or ""
    except Exception:  # some backends do not expose the optimized HLO
        hlo = ""
    return compiled, seconds, hlo


def gemm_kernels(hlo: str) -> str:
    """Which GEMM implementations the optimized HLO calls (custom-call targets, short names)."""
    import re
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    short = [t.replace("__cublas$lt$matmul", "cublasLt").replace("__cublas$gemm", "cublas") for t in targets]
    if not short and re.search(r"\bdot\(", hlo):
        short = ["xla-dot"]
    return ",".join(short)


def time_calls(compiled: Callable, argsets: Sequence[Sequence[Any]], iters: int) -> dict[str, float]:
    """Median / min ms per call: warm up, then `iters` groups of one call per input set, blocked."""
    for _ in range(2):
        jax.block_until_ready([compiled(*a) for a in argsets])
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready([compiled(*a) for a in argsets])
        times.append((time.perf_counter() - t0) / len(argsets))
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def measure(fn: Callable, argsets: Sequence[Sequence[Any]], flops: float, iters: int) -> dict[str, Any]:
    """Compile fn, time it, and report ms, TFLOP/s, compile time and the GEMM kernels used."""
    compiled, compile_s, hlo = compile_jit(fn, argsets[0])
    timing = time_calls(compiled, argsets, iters)
    return {**timing, "tflops": flops / (timing["ms"] * 1e-3) / 1e12, "compile_s": round(compile_s, 1),
            "kernels": gemm_kernels(hlo)}


def set_ratio(row: dict[str, Any], baseline: dict[str, Any] | None, key: str = "tflops") -> None:
    """row["ratio"] = row's rate / the baseline's (same run), when both were measured."""
    if baseline and row.get(key) and baseline.get(key):
        row["ratio"] = row[key] / baseline[key]


def per_tensor_fp8(x: jax.Array, dtype: Any = E4M3) -> tuple[jax.Array, jax.Array]:
    """(x / s as `dtype`, s) with s = amax / max(dtype) (448 for E4M3, 57344 for E5M2): per-tensor current
    scaling."""
    scale = jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-30) / float(jnp.finfo(dtype).max)
    return (x.astype(jnp.float32) / scale).astype(dtype), scale


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- gemm
GEMM_SHAPES = {"full": [(8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096)],
               "tiny": [(128, 128, 128), (256, 128, 192), (256, 192, 128)]}
GEMM_RECIPES = ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4")
EXTRA_RECIPES = ("fp8-delayed",)  # accepted by --recipes, not run by default
GEMM_REFS = ("bf16", "fp8", "mxfp8", "nvfp4")


def parse_quantize_impls(text: str) -> list[str]:
    """--quantize-impls: a comma list of lowbit.kernels.QUANTIZE_IMPLS, each a row per quantized variant."""
    from lowbit.kernels import QUANTIZE_IMPLS
    impls = parse_list(text)
    bad = [i for i in impls if i not in QUANTIZE_IMPLS]
    if bad or not impls:
        raise ValueError(f"--quantize-impls: unknown {bad or text!r}; choose from {QUANTIZE_IMPLS}")
    return impls


def select_shapes(spec: str | None, size: str) -> list[tuple[int, int, int]]:
    """--shapes: indices into the size's list and/or explicit MxKxN; default all of the size's shapes."""
    shapes = GEMM_SHAPES[size]
    if not spec:
        return list(shapes)
    chosen = []
    for item in parse_list(spec):
        if item.isdigit():
            if int(item) >= len(shapes):
                raise ValueError(f"--shapes index {item} out of range; {size} shapes: {shapes}")
            chosen.append(shapes[int(item)])
        else:
            parts = item.lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ValueError(f"--shapes entry {item!r}: use an index or MxKxN, e.g. 8192x8192x8192")
            chosen.append(tuple(int(p) for p in parts))
    return chosen


def gemm_backends(recipe_name: str) -> list[str]:
    """Backends worth timing for a recipe on this device: emulate, plus fp8 / native where they run."""
    from lowbit.backends import check_backend, device_info
    from lowbit.recipes import get_recipe
    recipe = get_recipe(recipe_name)
    if not recipe.quantized:
        return ["-"]
    names = ["emulate"]
    platform_name, cc = device_info()
    platform_name = "gpu" if platform_name in ("cuda", "rocm", "gpu") else platform_name
    for name in ("fp8", "native"):
        try:
            check_backend(recipe, name, platform_name, cc)
        except ValueError:
            continue
        names.append(name)
    if recipe_name == "fp8" and "fp8" not in names:
        names.append("fp8")  # asked for explicitly: on CPU XLA runs float8 dots too
    return names


def steady_history(recipe_name: str, x: jax.Array, w: jax.Array, dy: jax.Array) -> jax.Array | None:
    """For a delayed-scaling recipe, a full amax history of (x, w, dy): its steady state; else None."""
    import lowbit
    from lowbit.scaling import init_history, tensor_amax
    recipe = lowbit.get_recipe(recipe_name)
    if not recipe.delayed:
        return None
    amaxes = jnp.stack([tensor_amax(t)[0] for t in (x, w, dy)])
    return init_history(recipe.amax_history_len) + amaxes[:, None]


def fwd_bwd_fn(recipe_name: str, backend: str, quantize: str = "auto", history: jax.Array | None = None
               ) -> Callable:
    """(x [M,K], w [N,K], dy [M,N], key) -> (y, dx, dw) through lowbit.dot_general (3 GEMMs), traced
    with lowbit.kernels' quantize implementation `quantize` (auto | xla | fused). A delayed-scaling
    recipe runs from `history` (steady_history) and also returns the next history."""
    import lowbit
    from lowbit.kernels import quantize_impl
    dot = lowbit.dot_general(recipe_name, backend=None if backend == "-" else backend)

    def step(x, w, dy, key):
        if history is not None:
            y, pullback = jax.vjp(lambda a, b, h: dot(a, b, TN, preferred_element_type=BF16, key=key,
                                                      amax_history=h), x, w, history)
            return (y, *pullback(dy))
        y, pullback = jax.vjp(lambda a, b: dot(a, b, TN, preferred_element_type=BF16, key=key), x, w)
        return (y, *pullback(dy))

    def traced_under_impl(*args):
        with quantize_impl(quantize):
            return step(*args)

    return traced_under_impl


def fp8_gemm_operands(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, ...]:
    """x, w, w^T, dy, dy^T, x^T per-tensor quantized (E4M3; dy E5M2), each with its contraction dim last."""
    x8, w8, dy8 = per_tensor_fp8(x)[0], per_tensor_fp8(w)[0], per_tensor_fp8(dy, jnp.float8_e5m2)[0]
    return tuple(jax.block_until_ready(a) for a in (x8, w8, w8.T.copy(), dy8, dy8.T.copy(), x8.T.copy()))


def fp8_gemms_only(x8, w8, wt8, dy8, dyt8, xt8) -> tuple[jax.Array, ...]:
    """fprop x·wᵀ, dgrad dy·w, wgrad dyᵀ·x as three TN FP8 GEMMs (bf16 out): lowbit's fp8 recipe minus
    its quantization, amax and transpose passes."""
    def gemm(a, b):
        return lax.dot_general(a, b, TN, preferred_element_type=BF16)
    return gemm(x8, w8), gemm(dy8, wt8), gemm(dyt8, xt8)


def scaled_dot_general_fn(mode: str) -> Callable:
    config = jax.nn.get_scaled_dot_general_config(mode)
    return lambda x, w: jax.nn.scaled_dot_general(x, w, TN, preferred_element_type=BF16,
                                                  configs=[config, config, config])


def bench_gemm(args: argparse.Namespace) -> Runner:
    enable_compilation_cache(args.cache_dir)
    runner = Runner("gemm", args.json or default_json("bench_gemm"), args.time_budget_s, vars(args))
    recipes = parse_list(args.recipes)
    unknown = sorted(set(recipes) - set(GEMM_RECIPES + EXTRA_RECIPES))
    if unknown:
        raise ValueError(f"--recipes: unknown {unknown}; choose from {GEMM_RECIPES + EXTRA_RECIPES}")
    refs = [] if args.refs == "none" else parse_list(args.refs)
    impls = parse_quantize_impls(args.quantize_impls)
    key = jax.random.key(0)
    for m, k, n in select_shapes(args.shapes, args.size):
        shape = f"{m}x{k}x{n}"
        keys = jax.random.split(jax.random.key(m + k + n), 6)
        sets = 2
        xs = [jax.random.normal(keys[i], (m, k), BF16) for i in range(sets)]
        ws = [(jax.random.normal(keys[2 + i], (n, k), BF16) / math.sqrt(k)).astype(BF16) for i in range(sets)]
        dys = [jax.random.normal(keys[4 + i], (m, n), BF16) for i in range(sets)]
        step_args = [(xs[i], ws[i], dys[i], jax.random.fold_in(key, i)) for i in range(sets)]
        baseline = None
        for recipe_name in ["bf16"] + [r for r in recipes if r != "bf16"]:
            history = steady_history(recipe_name, *step_args[0][:3])
            for backend in gemm_backends(recipe_name):
                for impl in (["-"] if backend == "-" else impls):
                    row = {"shape": shape, "variant": recipe_name, "backend": backend, "quantize": impl,
                           "pass": "fwd+bwd"}
                    runner.run(row, lambda *a: measure(fwd_bwd_fn(*a[:4]), *a[4:]), recipe_name, backend,
                               "auto" if impl == "-" else impl, history, step_args, 6.0 * m * k * n,
                               args.iters)
                    if recipe_name == "bf16":
                        baseline = row
                    set_ratio(row, baseline)
        if "fp8" in refs:  # the fp8 recipe's floor: its 3 GEMMs on operands quantized and laid out beforehand
            row = {"shape": shape, "variant": "ref fp8 3 GEMMs, operands pre-quantized (no quantize)",
                   "backend": "-", "pass": "fwd+bwd"}
            runner.run(row, measure, fp8_gemms_only, [fp8_gemm_operands(*a[:3]) for a in step_args],
                       6.0 * m * k * n, args.iters)
            set_ratio(row, baseline)
        # Forward-only reference rows, as a ratio to BF16 forward.
        fwd_base = None
        quantized = [(per_tensor_fp8(x)[0], per_tensor_fp8(w)[0]) for x, w in zip(xs, ws, strict=True)]
        ref_fns = {
            "bf16": ("ref bf16 fwd (TN)", lambda x, w: lax.dot_general(x, w, TN, preferred_element_type=BF16),
                     [(x, w) for x, w in zip(xs, ws, strict=True)]),
            "fp8": ("ref raw fp8 E4M3 fwd (TN, bf16 out)",
                    lambda x, w: lax.dot_general(x, w, TN, preferred_element_type=BF16), quantized),
            "mxfp8": ("ref jax.nn.scaled_dot_general mxfp8 fwd", scaled_dot_general_fn("mxfp8"),
                      [(x, w) for x, w in zip(xs, ws, strict=True)]),
            "nvfp4": ("ref jax.nn.scaled_dot_general nvfp4 fwd", scaled_dot_general_fn("nvfp4"),
                      [(x, w) for x, w in zip(xs, ws, strict=True)]),
        }
        for ref in ["bf16"] + [r for r in refs if r != "bf16"] if refs else []:
            label, fn, argsets = ref_fns[ref]
            row = {"shape": shape, "variant": label, "backend": "-", "pass": "fwd"}
            runner.run(row, measure, fn, argsets, 2.0 * m * k * n, args.iters)
            if ref == "bf16":
                fwd_base = row
            set_ratio(row, fwd_base)
        del xs, ws, dys, step_args, quantized
    return runner


GEMM_COLUMNS = ("shape", "variant", "backend", "quantize", "pass", "ms", "tflops", "ratio", "compile_s",
                "kernels", "status", "error")


# ----------------------------------------------------------------------------- grouped
# name: (experts E, top-k, K, N). e8k2 = Mixtral-8x7B expert GEMM (emb 4096 -> 14336);
# e64k8 = DeepSeek-like fine-grained experts (64 experts top-8, expert width 2048, emb 4096).
GROUPED_CONFIGS = {
    "full": {"e8k2": (8, 2, 4096, 14336), "e64k8": (64, 8, 4096, 2048), "e64k2": (64, 2, 4096, 2048),
             "e8k8": (8, 8, 4096, 2048)},
    "tiny": {"e8k2": (8, 2, 64, 96), "e64k8": (64, 8, 64, 32), "e64k2": (64, 2, 64, 32),
             "e8k8": (8, 8, 64, 32)},
}
GROUPED_TOKENS = {"full": 16384, "tiny": 256}
GROUPED_VARIANTS = ("dense", "batched", "ragged_dot", "capacity", "grouped", "pallas", "mosaic")


def zipf_group_sizes(tokens: int, experts: int, top_k: int, exponent: float, seed: int) -> np.ndarray:
    """Slots per expert when each token picks top_k distinct experts, expert e with weight (e+1)^-a.

    Sampling without replacement by Gumbel-top-k on log weights (fixed seed).
    """
    rng = np.random.default_rng(seed)
    log_w = -exponent * np.log(np.arange(1, experts + 1))
    scores = log_w[None, :] + rng.gumbel(size=(tokens, experts))
    choice = np.argsort(-scores, axis=1)[:, :top_k]
    return np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32)


def capacity_matmul(x_sorted: jax.Array, w_enk: jax.Array, group_sizes: jax.Array, capacity: int,
                    out_dtype: Any = BF16) -> jax.Array:
    """Capacity-padded expert GEMM: rows -> [E, C, K] (overflow dropped), batched TN GEMM, back to rows.

    Row t of group g sits at slot t - offset[g]; slots >= C are dropped (zero output).
    """
    rows = x_sorted.shape[0]
    experts = w_enk.shape[0]
    offsets = jnp.cumsum(group_sizes) - group_sizes
    ends = jnp.cumsum(group_sizes)
    group = jnp.clip(jnp.searchsorted(ends, jnp.arange(rows), side="right"), 0, experts - 1)
    slot = jnp.arange(rows) - offsets[group]
    slot = jnp.where((slot < capacity) & (jnp.arange(rows) < jnp.sum(group_sizes)), slot, capacity)
    buffer = jnp.zeros((experts, capacity, x_sorted.shape[1]), x_sorted.dtype)
    buffer = buffer.at[group, slot].set(x_sorted, mode="drop")
    y = lax.dot_general(buffer, w_enk, (((2,), (2,)), ((0,), (0,))), preferred_element_type=out_dtype)
    return y.at[group, slot].get(mode="fill", fill_value=0)


def parse_chunks(text: str) -> list[tuple[int, int]]:
    """'256:2048,512:512' -> [(256, 2048), (512, 512)] (small chunk : big chunk rows)."""
    out = []
    for item in parse_list(text):
        small, _, big = item.partition(":")
        out.append((int(small), int(big or small)))
    return out


def _vjp_fn(forward: Callable) -> Callable:
    """(x, w, dy, *rest) -> (y, dx, dw) for a forward (x, w, *rest) -> y."""
    def step(x, w, dy, *rest):
        y, pullback = jax.vjp(lambda a, b: forward(a, b, *rest), x, w)
        return (y, *pullback(dy))
    return step


def parse_pallas_tiles(text: str) -> list[tuple[int, ...]]:
    """'128:64:128:8,64:64:128' -> [(128, 64, 128, 8, 3), (64, 64, 128, 4, 3)]: bm:bk:bn[:warps[:stages]]."""
    out = []
    for item in parse_list(text):
        fields = [int(f) for f in item.split(":")]
        if not 3 <= len(fields) <= 5:
            raise ValueError(f"--pallas-tiles: {item!r} is not bm:bk:bn[:num_warps[:num_stages]]")
        out.append(tuple(fields + [4, 3][len(fields) - 3:]))
    return out


def parse_mosaic_tiles(text: str) -> list[tuple[int, int, int, int, bool, int | None]]:
    """'128:128:128:4,128:128:128:4:ws:b8' -> [(128, 128, 128, 4, False, None), (128, 128, 128, 4, True, 8)].

    bm:bn:bk[:stages] then optional flags: ws (warp-specialized: a TMA warpgroup and two WGMMA warpgroups,
    bm x 2bn) and bN (bands of N blocks swept over all row tiles: grouped_matmul_mosaic's `band`).
    """
    out = []
    for item in parse_list(text):
        fields = item.split(":")
        flags = [f for f in fields if not f.isdigit()]
        numbers = [int(f) for f in fields if f.isdigit()]
        bands = [f for f in flags if f[:1] == "b" and f[1:].isdigit()]
        if not 3 <= len(numbers) <= 4 or set(flags) - {"ws", *bands} or len(bands) > 1:
            raise ValueError(f"--mosaic-tiles: {item!r} is not bm:bn:bk[:stages][:ws][:bN]")
        bm, bn, bk, stages = numbers + [4][len(numbers) - 3:]
        out.append((bm, bn, bk, stages, "ws" in flags, int(bands[0][1:]) if bands else None))
    return out


def grouped_variants(names: Sequence[str], experts: int, sizes: jax.Array, capacity: int,
                     chunks: Sequence[tuple[int, int]], fp8: bool,
                     pallas_tiles: Sequence[tuple[int, ...]] = ((128, 64, 256, 8, 3),),
                     mosaic_tiles: Sequence[tuple[Any, ...]] = ((128, 128, 128, 4, True, None),),
                     ) -> list[tuple[str, str, Callable]]:
    """(name, weight layout, forward fn(x, w, *extra)) per requested variant."""
    from lowbit.grouped import grouped_matmul
    out_dtype = BF16
    variants = []
    if "dense" in names:
        variants.append(("dense (same useful FLOPs)", "nk",
                         lambda x, w: lax.dot_general(x, w, TN, preferred_element_type=out_dtype)))
    if "batched" in names:
        variants.append(("batched balanced [E, S/E, K]", "enk", lambda x, w: lax.dot_general(
            x.reshape(experts, -1, x.shape[1]), w, (((2,), (2,)), ((0,), (0,))),
            preferred_element_type=out_dtype).reshape(x.shape[0], -1)))
    if "ragged_dot" in names:
        variants.append(("ragged_dot (dropless reference)", "ekn",
                         lambda x, w: lax.ragged_dot(x, w, sizes, preferred_element_type=out_dtype)))
    if "capacity" in names:
        variants.append((f"capacity cf=1.25 (C={capacity}, drops)", "enk",
                         lambda x, w: capacity_matmul(x, w, sizes, capacity, out_dtype)))
    if "grouped" in names:
        for small, big in chunks:
            variants.append((f"lowbit.grouped chunk={small}/{big} (dropless)", "enk",
                             lambda x, w, s=small, b=big: grouped_matmul(
                                 x, w, sizes, rhs_layout="enk", chunk=s, big_chunk=b,
                                 preferred_element_type=out_dtype)))
    if "pallas" in names:
        from lowbit.kernels.grouped_pallas import grouped_matmul as pallas_grouped_matmul
        layout = "enk" if fp8 else "ekn"  # Hopper's FP8 MMA wants both operands K-major
        for bm, bk, bn, warps, stages in pallas_tiles:
            variants.append((f"pallas grouped {bm}x{bk}x{bn} w{warps}s{stages} (dropless)", layout,
                             lambda x, w, t=(bm, bk, bn), nw=warps, ns=stages: pallas_grouped_matmul(
                                 x, w, sizes, preferred_element_type=out_dtype, tile=t, rhs_layout=layout,
                                 num_warps=nw, num_stages=ns)))
    if "mosaic" in names:  # forward only (lowbit.kernels.grouped_mosaic): TMA + WGMMA, persistent
        from lowbit.kernels.grouped_mosaic import grouped_matmul_mosaic
        for bm, bn, bk, stages, ws, band in mosaic_tiles:
            label = (f"mosaic grouped {bm}x{bn}x{bk} s{stages}{' ws' if ws else ''}"
                     f"{f' band {band}' if band else ''} (dropless, fwd only)")
            variants.append((label, "enk", lambda x, w, t=(bm, bn, bk), ns=stages, ws=ws, b=band:
                             grouped_matmul_mosaic(x, w, sizes, preferred_element_type=out_dtype, tile=t,
                                                   stages=ns, warp_specialized=ws, band=b)))
    return variants


def _relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _measure_grouped(forward: Callable, argsets: list, mode: str, flops: float, iters: int,
                     reference: jax.Array | None) -> dict[str, Any]:
    """Time one grouped variant (forward, or forward+backward via its VJP); error vs ragged_dot's output."""
    if mode != "fwd":
        return measure(_vjp_fn(forward), argsets, flops, iters)
    result = measure(forward, argsets, flops, iters)
    if reference is not None:
        result["relerr_vs_ragged"] = _relative_error(jax.jit(forward)(*argsets[0]), reference)
    return result


def bench_grouped(args: argparse.Namespace) -> Runner:
    enable_compilation_cache(args.cache_dir)
    runner = Runner("grouped", args.json or default_json("bench_grouped"), args.time_budget_s, vars(args))
    configs = GROUPED_CONFIGS[args.size]
    chosen = parse_list(args.configs)
    unknown = sorted(set(chosen) - set(configs))
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; choose from {sorted(configs)}")
    names = parse_list(args.variants)
    bad = sorted(set(names) - set(GROUPED_VARIANTS))
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {GROUPED_VARIANTS}")
    passes = parse_list(args.passes)
    tokens = args.tokens or GROUPED_TOKENS[args.size]
    for config in chosen:
        experts, top_k, k, n = configs[config]
        slots = tokens * top_k
        sizes_np = zipf_group_sizes(tokens, experts, top_k, args.zipf, args.seed)
        sizes = jnp.asarray(sizes_np)
        capacity = math.ceil(slots / experts * args.capacity_factor)
        dropped = float(np.maximum(sizes_np - capacity, 0).sum() / slots)
        routing = {"max_over_mean": float(sizes_np.max() / sizes_np.mean()), "dropped_at_cf": dropped}
        keys = jax.random.split(jax.random.key(args.seed), 6)
        xs = [jax.random.normal(keys[i], (slots, k), BF16) for i in range(2)]
        w_ekn = [(jax.random.normal(keys[2 + i], (experts, k, n), BF16) / math.sqrt(k)).astype(BF16)
                 for i in range(2)]
        dys = [jax.random.normal(keys[4 + i], (slots, n), BF16) for i in range(2)]
        print(f"== {config}: E={experts} top-{top_k} T={tokens} S={slots} K={k} N={n} "
              f"group sizes {sizes_np.tolist()} {routing}", flush=True)
        for dtype in parse_list(args.dtypes):
            fp8 = dtype == "fp8"
            layouts = {"ekn": w_ekn, "enk": [jnp.swapaxes(w, 1, 2) for w in w_ekn],
                       "nk": [w[0].T for w in w_ekn]}
            if fp8:
                xs_in = [per_tensor_fp8(x)[0] for x in xs]
                layouts = {name: [per_tensor_fp8(w)[0] for w in ws] for name, ws in layouts.items()}
            else:
                xs_in = xs
            reference = None
            for mode in passes:
                if fp8 and mode != "fwd":
                    continue  # raw FP8 operands have no backward pass here (lowbit.dot does that)
                dense_row = None
                for label, layout, forward in grouped_variants(names, experts, sizes, capacity,
                                                               parse_chunks(args.chunks), fp8,
                                                               parse_pallas_tiles(args.pallas_tiles),
                                                               parse_mosaic_tiles(args.mosaic_tiles)):
                    if mode != "fwd" and label.startswith("mosaic"):
                        continue  # the Mosaic GPU kernel has no backward pass
                    row = {"config": config, "dtype": dtype, "pass": mode, "variant": label, **routing}
                    flops = (2.0 if mode == "fwd" else 6.0) * slots * k * n
                    if mode == "fwd":
                        argsets = [(xs_in[i], layouts[layout][i]) for i in range(2)]
                    else:
                        argsets = [(xs_in[i], layouts[layout][i], dys[i]) for i in range(2)]
                    check = mode == "fwd" and ("dropless" in label or "capacity" in label)
                    patched = triton_fp8_acc.patched_dot_count()
                    runner.run(row, _measure_grouped, forward, argsets, mode, flops, args.iters,
                               reference if check else None)
                    if fp8 and label.startswith("pallas"):  # which FP8 accumulation this timing ran with
                        row["fp8_max_imprecise_acc"] = triton_fp8_acc.get_fp8_max_imprecise_acc()
                        row["fp8_dots_patched"] = triton_fp8_acc.patched_dot_count() - patched
                    is_ragged = label.startswith("ragged_dot")
                    if check and reference is None and is_ragged and row["status"] == "ok":
                        reference = jax.jit(forward)(*argsets[0])
                    if label.startswith("dense"):
                        dense_row = row
                    set_ratio(row, dense_row)
        del xs, w_ekn, dys
    return runner


GROUPED_COLUMNS = ("config", "dtype", "pass", "variant", "ms", "tflops", "ratio", "relerr_vs_ragged",
                   "max_over_mean", "dropped_at_cf", "compile_s", "kernels", "status", "error")


def add_ragged_ratio(runner: Runner) -> None:
    """Each grouped row's rate as a multiple of ragged_dot's for the same config, dtype and pass."""
    by_key = {(r["config"], r["dtype"], r["pass"]): r for r in runner.rows
              if r["variant"].startswith("ragged_dot") and r.get("tflops")}
    for row in runner.rows:
        ragged = by_key.get((row["config"], row["dtype"], row["pass"]))
        if ragged and row.get("tflops"):
            row["x_ragged"] = row["tflops"] / ragged["tflops"]


# ----------------------------------------------------------------------------- command line
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("full", "tiny"), default="full",
                        help="full: GPU sizes; tiny: CPU-sized smoke test")
    parser.add_argument("--time-budget-s", type=float, default=480.0,
                        help="stop starting new variants after this many seconds (default 480)")
    parser.add_argument("--cache-dir", default=None, help="persistent XLA compilation cache directory")
    parser.add_argument("--json", default=None, help="output JSON path (default $OUT/<bench>.json or ./)")
    parser.add_argument("--iters", type=int, default=10, help="timed groups per variant (median reported)")


def add_quantize_impls_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize-impls", default="auto",
                        help="comma list of quantize implementations (auto, xla, fused: "
                             "lowbit.kernels.set_quantize_impl), one row each per quantized recipe")


def add_gemm_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("gemm", help="fprop+dgrad+wgrad per recipe/backend vs bf16, plus references")
    add_common_args(p)
    p.add_argument("--recipes", default=",".join(GEMM_RECIPES), help="comma list (bf16 always runs)")
    p.add_argument("--shapes", default=None,
                   help="comma list of indices into the size's shapes or MxKxN (full: 0=8192^3, "
                        "1=16384x4096x14336, 2=16384x14336x4096)")
    p.add_argument("--refs", default=",".join(GEMM_REFS),
                   help="forward reference rows: bf16,fp8,mxfp8,nvfp4 or none")
    add_quantize_impls_arg(p)
    p.set_defaults(func=bench_gemm, columns=GEMM_COLUMNS)


def add_grouped_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("grouped",
                              help="MoE grouped GEMM: dense, ragged_dot, capacity, lowbit.grouped, pallas")
    add_common_args(p)
    p.add_argument("--configs", default="e8k2,e64k8",
                   help="comma list of e8k2 (Mixtral), e64k8 (DeepSeek-like), e64k2, e8k8")
    p.add_argument("--variants", default=",".join(v for v in GROUPED_VARIANTS if v != "mosaic"),
                   help=f"comma list of {GROUPED_VARIANTS} (default: all but mosaic, a Hopper-only kernel)")
    p.add_argument("--dtypes", default="bf16,fp8", help="bf16,fp8 (fp8: per-tensor E4M3 operands, forward)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd (bf16 only)")
    p.add_argument("--tokens", type=int, default=None, help="tokens T (default 16384; tiny 256)")
    p.add_argument("--zipf", type=float, default=0.5, help="expert popularity exponent a: p_e ~ (e+1)^-a")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--chunks", default="256:2048,512:512",
                   help="lowbit.grouped chunk settings small:big, comma separated")
    p.add_argument("--pallas-tiles", default="128:64:256:8:3",
                   help="pallas variant fprop/dgrad tiles bm:bk:bn[:num_warps[:num_stages]], comma "
                        "separated (wgrad keeps grouped_pallas.WGRAD_TILE)")
    p.add_argument("--mosaic-tiles", default="128:128:128:4:ws",
                   help="mosaic variant (forward only, Hopper) tiles bm:bn:bk[:stages][:ws][:bN], comma "
                        "separated (ws: warp-specialized, two WGMMA warpgroups of bm x bn; bN: bands of N "
                        "N-blocks)")
    p.set_defaults(func=bench_grouped, columns=GROUPED_COLUMNS)


SUBCOMMANDS = {"gemm": add_gemm_parser, "grouped": add_grouped_parser}


def run_and_report(args: argparse.Namespace) -> int:
    """Run the chosen benchmark, print its table, write its JSON; exit code 0 if any row ran."""
    runner = args.func(args)
    if args.func is bench_grouped:
        add_ragged_ratio(runner)
    columns = list(args.columns)
    if args.func is bench_grouped:
        columns.insert(columns.index("ratio") + 1, "x_ragged")
    runner.write()
    print("\n" + runner.table(columns), flush=True)
    print(f"\nJSON: {runner.json_path}  ({runner.elapsed():.0f} s)")
    return 0 if any(r.get("status") == "ok" for r in runner.rows) else 1


def cli_main(prog: str, doc: str, subcommands: dict, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None) -> int:
    """Parse `argv` for the given subcommands and run them (shared by bench_gemm and bench_step)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in subcommands.values():
        add(subparsers)
    return run(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("python -m lowbit.bench_gemm", __doc__, SUBCOMMANDS, run_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
