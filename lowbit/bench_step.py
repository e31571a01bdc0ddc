"""Train-step time per recipe and a B200 roofline projection: `python -m lowbit.bench_step {step,roofline}`.

step: the jitted train step of `lowbit.train` (built by its own train.build_step; random tokens
instead of the data pipeline) per recipe: median step time, tokens/s, model TFLOP/s
(3 x flops_per_token x tokens), ratio to BF16, peak device memory and the compiled memory analysis.
Each (config, recipe) runs in its own process by default, so that peak memory is per recipe and an
out-of-memory failure stays one row.
roofline: projected step time on a B200 per recipe from the model's GEMM FLOPs (which pass runs
at which rate) plus non-GEMM time from HBM bytes; see docs/roofline.md for every assumption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lowbit.bench_gemm import (
    Runner,
    cli_main,
    default_json,
    enable_compilation_cache,
    error_text,
    parse_list,
    parse_quantize_impls,
)

STEP_RECIPES = ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4")
STEP_TOKENS = ("random", "data")
# name: (shipped config, key=value overrides). moe-1.8b: 1.85B parameters (0.64B active), 8 layers,
# emb 2048, 8 experts top-2 of width 4096, vocab 32768, T=2048, batch 8: f32 weights + AdamW + grads
# take ~30 GB, so it fits one 80 GB H100 without remat (peak 42.5 GB with cuDNN attention, 55 GB with XLA's).
# moe-2.8b: the same at emb 2560 (20 query / 4 kv heads of 128), experts 5120 wide: 2.81B parameters (0.92B
# active), ~45 GB of weights + AdamW + grads; sized for the 80 GB H100 from those figures, not yet run.
STEP_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny": ("tiny", ("global_batch_size=8",)),
    "small": ("small", ("moe_impl=capacity", "global_batch_size=64")),
    "moe-1.8b": ("small", ("vocab_size=32768", "use_iota_embed=false", "emb_dim=2048", "mlp_dim=8192",
                           "moe_mlp_dim=4096",
                           "num_query_heads=16", "num_kv_heads=8", "head_dim=128", "num_decoder_layers=8",
                           "num_experts=8", "num_experts_per_tok=2", "max_target_length=2048",
                           "global_batch_size=8", "moe_impl=capacity", "remat_policy=none")),
}
STEP_CONFIGS["moe-2.8b"] = ("small", (*STEP_CONFIGS["moe-1.8b"][1], "emb_dim=2560", "num_query_heads=20",
                                      "num_kv_heads=4", "moe_mlp_dim=5120", "mlp_dim=10240"))


# ----------------------------------------------------------------------------- step (one process)
def load_step_config(name: str, extra: Sequence[str] = ()) -> Any:
    """The lowbit.config.Config of a STEP_CONFIGS entry (plus extra key=value overrides)."""
    from lowbit.config import load_config
    if name not in STEP_CONFIGS:
        raise ValueError(f"unknown step config {name!r}; choose one of {sorted(STEP_CONFIGS)}")
    base, overrides = STEP_CONFIGS[name]
    return load_config(base, [*overrides, *extra])


def peak_device_bytes(devices: Iterable[Any]) -> int | None:
    """The largest peak_bytes_in_use over the step's devices (None where no device reports it: CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def _memory_analysis(compiled: Any) -> dict[str, int]:
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def step_batch(config: Any, mesh: Any, tokens: str = "random") -> dict[str, Any]:
    """One sharded global batch: uniform random ids (seed 0), or the config's first training batch."""
    import numpy as np

    from lowbit import train
    if tokens == "data":
        from lowbit.data import make_train_iter
        return train.shard_batch(next(make_train_iter(config.data)), mesh)
    shape = (config.data.global_batch_size, config.model.max_target_length + 1)
    ids = np.random.default_rng(0).integers(1, config.model.vocab_size, shape).astype(np.int32)
    return train.shard_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]}, mesh)


def measure_step(config_name: str, recipe_name: str, steps: int, backend: str = "auto",
                 overrides: Sequence[str] = (), tokens: str = "random",
                 quantize: str = "auto") -> dict[str, Any]:
    """Build the model and step exactly as lowbit.train does, then time `steps` steps after 2 warm-ups.

    tokens: "random" (uniform ids) or "data" (the config's first training batch). Values matter: the
    embedding gradient's scatter-add serializes on hot rows of real text (docs/benchmarks.md).
    quantize: lowbit.kernels' quantize implementation the step is traced with (auto | xla | fused).
    """
    if tokens not in STEP_TOKENS:
        raise ValueError(f"tokens must be one of {STEP_TOKENS}, got {tokens!r}")
    import jax
    import jax.numpy as jnp

    from lowbit import train
    from lowbit.kernels import quantize_impl
    from lowbit.model import flops_per_token
    from lowbit.model.attention import config_attention_impl

    config = load_step_config(config_name, overrides)
    parts = train.build_step(config, recipe_name, backend)
    mesh, state, step_fn, schedule = parts.mesh, parts.state, parts.train_step, parts.schedule
    batch_size, length = config.data.global_batch_size, config.model.max_target_length
    batch, zero = step_batch(config, mesh, tokens), jnp.float32(0.0)

    jax.clear_caches()  # the quantize switch is read while tracing, and is not part of jit's cache key
    t0 = time.perf_counter()
    with quantize_impl(quantize):
        compiled = step_fn.lower(state, batch, schedule, zero).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, batch, schedule, zero)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, schedule, zero)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_step = batch_size * length
    peak = peak_device_bytes(mesh.devices.flat)
    row = {"ms": step_s * 1e3, "min_ms": min(times) * 1e3, "tokens_per_s": tokens_per_step / step_s,
           "model_tflops": 3 * flops_per_token(config.model) * tokens_per_step / step_s / 1e12,
           "compile_s": round(compile_s, 1), "loss": float(metrics["loss"]),
           "backends": sorted({parts.recipe.backend}),
           "peak_gb": None if peak is None else peak / 2**30, "devices": mesh.size,
           "tokens_per_step": tokens_per_step, "moe_impl": config.model.moe_impl,
           "attention": config_attention_impl(config.model)}
    analysis = _memory_analysis(compiled)
    row.update(analysis)
    if analysis:
        used = analysis.get("temp_size_in_bytes", 0) + analysis.get("argument_size_in_bytes", 0)
        row["compiled_gb"] = used / 2**30
    return row


def _worker(args: argparse.Namespace) -> int:
    """Hidden entry: one (config, recipe) in this process, result JSON to --worker-out."""
    enable_compilation_cache(args.cache_dir)
    try:
        result = measure_step(args.configs, args.recipes, args.steps, args.backend, args.override,
                              args.tokens, args.quantize_impls)
    except Exception as error:
        result = {"error": error_text(error)}
    Path(args.worker_out).write_text(json.dumps(result, default=str))
    return 0


def _in_subprocess(args: argparse.Namespace, config: str, recipe: str, impl: str,
                   timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "lowbit.bench_step", "step", "--configs", config,
                   "--recipes", recipe, "--steps", str(args.steps), "--backend", args.backend,
                   "--tokens", args.tokens, "--quantize-impls", impl, "--worker-out", str(out)]
        command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        for item in args.override:
            command += ["--override", item]
        try:
            proc = subprocess.run(command, timeout=max(timeout_s, 1.0), capture_output=True, text=True)
        except subprocess.TimeoutExpired as error:
            raise TimeoutError(f"step {config}/{recipe} ran past the time budget "
                               f"({timeout_s:.0f} s)") from error
        if not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"worker exited with code {proc.returncode} and no result:\n{tail}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def bench_step(args: argparse.Namespace) -> Runner:
    enable_compilation_cache(args.cache_dir)
    runner = Runner("step", args.json or default_json("bench_step"), args.time_budget_s, vars(args))
    recipes = parse_list(args.recipes)
    impls = parse_quantize_impls(args.quantize_impls)
    variants = [("bf16", "-")] + [(r, i) for r in recipes if r != "bf16" for i in impls]
    for config in parse_list(args.configs):
        baseline = None
        for recipe, impl in variants:
            row = {"config": config, "recipe": recipe, "quantize": impl}
            impl = "auto" if impl == "-" else impl
            if args.isolate == "process":
                # The worker gets what is left of the budget (plus a little to finish a started step).
                remaining = args.time_budget_s - runner.elapsed() + 30
                runner.run(row, _in_subprocess, args, config, recipe, impl, remaining)
            else:
                runner.run(row, measure_step, config, recipe, args.steps, args.backend, args.override,
                           args.tokens, impl)
            if recipe == "bf16":
                baseline = row
            if baseline and row.get("ms") and baseline.get("ms"):
                row["ratio"] = baseline["ms"] / row["ms"]  # > 1: faster than bf16
                runner.write()  # the JSON holds the ratio even if an outer timeout ends the next recipe
    return runner


STEP_COLUMNS = ("config", "recipe", "quantize", "devices", "moe_impl", "attention", "ms", "tokens_per_s",
                "model_tflops", "ratio", "peak_gb", "compiled_gb", "compile_s", "loss", "status", "error")


# ----------------------------------------------------------------------------- roofline
@dataclasses.dataclass(frozen=True)
class Hardware:
    """Dense tensor-core rates (FLOP/s) and HBM bandwidth (B/s). B200 defaults (NVIDIA datasheet, dense)."""

    name: str = "B200"
    bf16: float = 2.25e15
    fp8: float = 4.5e15
    fp4: float = 9.0e15
    hbm: float = 8.0e12


B200 = Hardware()
_FORMAT_RATE = {"fp8": "fp8", "fp8_e5m2": "fp8", "mxfp8": "fp8", "mxfp8_e5m2": "fp8", "mxfp6_e2m3": "fp8",
                "mxfp6_e3m2": "fp8", "mxfp4": "fp4", "nvfp4": "fp4"}
# Bytes per element written by a quantization (data + block scale), by format.
_QUANT_BYTES = {"fp8": 1.0, "fp8_e5m2": 1.0, "mxfp8": 1 + 1 / 32, "mxfp8_e5m2": 1 + 1 / 32,
                "mxfp6_e2m3": 0.75 + 1 / 32, "mxfp6_e3m2": 0.75 + 1 / 32, "mxfp4": 0.5 + 1 / 32,
                "nvfp4": 0.5 + 1 / 16}
# AdamW: read p, g, m, v (16) + write p, m, v (12) + f32 -> bf16 weight cast (6) + gradient zero/add (2).
OPTIMIZER_BYTES_PER_PARAM = 36


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One linear GEMM of the model per token: forward FLOPs, in/out features, weight count, module path."""

    path: str
    flops: float  # forward FLOPs per token (2 x d_in x d_out x tokens-per-token-routing)
    d_in: float  # activation elements read per token (X)
    d_out: float  # gradient elements per token (dY)
    params: int


def model_gemms(cfg: Any) -> list[Gemm]:
    """Every GEMM hook of the decoder (docs/architecture.md paths), per token, routed experts x top-k."""
    emb, hq, hkv, dh = cfg.emb_dim, cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim
    gemms = []

    def linear(path, d_in, d_out, copies=1.0, params_copies=1):
        gemms.append(Gemm(path, 2.0 * d_in * d_out * copies, d_in * copies, d_out * copies,
                          d_in * d_out * params_copies))

    for i in range(cfg.num_decoder_layers):
        prefix = f"layers/{i}"
        linear(f"{prefix}/attention/query", emb, hq * dh)
        linear(f"{prefix}/attention/key", emb, hkv * dh)
        linear(f"{prefix}/attention/value", emb, hkv * dh)
        linear(f"{prefix}/attention/out", hq * dh, emb)
        if cfg.layer_is_moe(i):
            k, e, width = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_mlp_dim
            linear(f"{prefix}/moe/router", emb, e)
            for name in ("wi_0", "wi_1"):
                linear(f"{prefix}/moe/experts/{name}", emb, width, copies=k, params_copies=e)
            linear(f"{prefix}/moe/experts/wo", width, emb, copies=k, params_copies=e)
            if cfg.num_shared_experts:
                shared = cfg.num_shared_experts * width
                for name in ("wi_0", "wi_1"):
                    linear(f"{prefix}/moe/shared_expert/{name}", emb, shared)
                linear(f"{prefix}/moe/shared_expert/wo", shared, emb)
        else:
            for name in ("wi_0", "wi_1"):
                linear(f"{prefix}/mlp/{name}", emb, cfg.mlp_dim)
            linear(f"{prefix}/mlp/wo", cfg.mlp_dim, emb)
    if not cfg.logits_via_embedding:
        linear("logits_dense", emb, cfg.vocab_size)
    return gemms


def _kept_layers(cfg: Any, fraction: float) -> set[int]:
    """The last ceil(f·L) layers (lowbit.nn.convert.kept_layers' rule)."""
    if fraction <= 0:
        return set()
    n = cfg.num_decoder_layers
    return set(range(n - math.ceil(fraction * n), n))


def gemm_is_quantized(path: str, recipe: Any, kept: set[int]) -> bool:
    """Whether quantize_model would convert this GEMM (not matched by a rule, not in a kept layer)."""
    if any(re.search(rule, path) for rule in recipe.high_precision_rules):
        return False
    match = re.match(r"layers/(\d+)/", path)
    return not (match and int(match.group(1)) in kept)


def pass_rate(pass_config: Any, hw: Hardware) -> float:
    """Tensor-core rate of a GEMM pass: its operands' slower format; BF16 unless both are quantized."""
    if not (pass_config.lhs.quantized and pass_config.rhs.quantized):
        return hw.bf16
    kinds = {_FORMAT_RATE[op.format] for op in (pass_config.lhs, pass_config.rhs)}
    return hw.fp8 if "fp8" in kinds else hw.fp4


def _quant_bytes_per_token(gemm: Gemm, recipe: Any) -> float:
    """HBM bytes per token to quantize X and dY for this GEMM's passes (read bf16, write data+scales,
    +4 B/element read+write bf16 where a random Hadamard transform runs first). Weights: per step."""
    total = 0.0
    operands = {"fprop": (gemm.d_in, None), "dgrad": (gemm.d_out, None), "wgrad": (gemm.d_in, gemm.d_out)}
    for name, pc in recipe.passes.items():
        lhs_elems, rhs_elems = operands[name]
        activations = [(pc.lhs, lhs_elems)] + ([(pc.rhs, rhs_elems)] if rhs_elems is not None else [])
        for op, elems in activations:
            if op.quantized:
                total += elems * (2 + _QUANT_BYTES[op.format] + (4 if pc.hadamard_block else 0))
    return total


def _weight_quant_bytes(gemm: Gemm, recipe: Any) -> float:
    """HBM bytes per step to quantize this GEMM's weights for fprop and dgrad (read bf16, write q)."""
    total = 0.0
    for name in ("fprop", "dgrad"):
        op = recipe.passes[name].rhs
        if op.quantized:
            total += gemm.params * (2 + _QUANT_BYTES[op.format])
    return total


def activation_bytes_per_token(cfg: Any) -> float:
    """Non-GEMM HBM traffic per token of forward + backward (bf16, 2 B/element), all layers + loss.

    Per layer forward: 2 RMSNorms (read+write emb), 2 residual adds (2 reads + 1 write of emb),
    RoPE on q and k (read+write), flash attention reads q, k, v and writes o; MoE: dispatch and
    combine (k copies of emb each way), SwiGLU (read gate, up; write hidden); dense MLP the same.
    Backward ~ 2x forward. Loss: f32 logits written, read by softmax and its gradient (16 B x V).
    """
    emb, hq, hkv, dh = cfg.emb_dim, cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim
    total = 0.0
    for i in range(cfg.num_decoder_layers):
        elements = 2 * 2 * emb + 2 * 3 * emb + 2 * (hq + hkv) * dh + (2 * hq + 2 * hkv) * dh
        if cfg.layer_is_moe(i):
            k = cfg.num_experts_per_tok
            shared = cfg.num_shared_experts * cfg.moe_mlp_dim
            elements += 2 * 2 * k * emb + 3 * k * cfg.moe_mlp_dim + 3 * shared
        else:
            elements += 3 * cfg.mlp_dim
        forward_passes = 2 if cfg.remat_policy == "full" else 1
        total += (forward_passes + 2) * elements * 2
    return total + 16.0 * cfg.vocab_size


def roofline(cfg: Any, recipe: Any, hw: Hardware = B200, tokens_per_step: int | None = None,
             seq_len: int | None = None) -> dict[str, Any]:
    """Projected B200 step time: Σ_GEMMs Σ_passes FLOPs / rate(pass) + HBM bytes / bandwidth.

    Rates: a pass whose two operands are quantized runs at the FP8 (fp8, mxfp8) or FP4 (nvfp4,
    mxfp4) rate, else BF16; layers kept by rules / keep_last_fraction run BF16. Attention's
    QKᵀ/PV run BF16 (x3 for fwd + bwd). remat_policy "full" runs every forward GEMM twice.
    """
    from lowbit.model import num_params
    from lowbit.recipes import get_recipe

    recipe = get_recipe(recipe)
    seq_len = cfg.max_target_length if seq_len is None else seq_len
    tokens = tokens_per_step or seq_len
    kept = _kept_layers(cfg, recipe.keep_last_fraction)
    forward_copies = 2 if cfg.remat_policy == "full" else 1
    gemm_s = bwd_gemm_s = quant_b = weight_b = 0.0
    flops_by_rate: dict[str, float] = {"bf16": 0.0, "fp8": 0.0, "fp4": 0.0}
    names = {hw.bf16: "bf16", hw.fp8: "fp8", hw.fp4: "fp4"}
    for gemm in model_gemms(cfg):
        quantized = gemm_is_quantized(gemm.path, recipe, kept) and recipe.quantized
        for name, pc in recipe.passes.items():
            rate = pass_rate(pc, hw) if quantized else hw.bf16
            flops = gemm.flops * (forward_copies if name == "fprop" else 1)
            gemm_s += flops / rate
            bwd_gemm_s += 0.0 if name == "fprop" else flops / rate
            flops_by_rate[names[rate]] += flops
        if quantized:
            quant_b += _quant_bytes_per_token(gemm, recipe)
            weight_b += _weight_quant_bytes(gemm, recipe)
    attention_flops = 2.0 * seq_len * cfg.num_query_heads * cfg.head_dim * cfg.num_decoder_layers  # causal
    attention_flops *= 2 + forward_copies  # fwd (x remat) + bwd (2x)
    gemm_s += attention_flops / hw.bf16
    bwd_gemm_s += attention_flops * 2 / (2 + forward_copies) / hw.bf16
    flops_by_rate["bf16"] += attention_flops
    activation_b = activation_bytes_per_token(cfg)
    per_step_b = num_params(cfg) * OPTIMIZER_BYTES_PER_PARAM + weight_b
    bytes_per_token = activation_b + quant_b + per_step_b / tokens
    memory_s = bytes_per_token / hw.hbm
    total_flops = sum(flops_by_rate.values())
    return {"recipe": recipe.name, "gemm_us_per_token": gemm_s * 1e6,
            "memory_us_per_token": memory_s * 1e6,
            "step_us_per_token": (gemm_s + memory_s) * 1e6, "tokens_per_s": 1.0 / (gemm_s + memory_s),
            "frac_flops_fp8": flops_by_rate["fp8"] / total_flops,
            "frac_flops_fp4": flops_by_rate["fp4"] / total_flops,
            "bytes_per_token": bytes_per_token, "quant_bytes_per_token": quant_b, "gemm_s": gemm_s,
            "bwd_gemm_s": bwd_gemm_s,
            "memory_s": memory_s, "flops_per_token": total_flops}


# name: (shipped config, global tokens per optimizer step). small: as configs/small.yaml trains it;
# the large shapes: 2^20 tokens per step (typical pretraining batch; the optimizer's per-step bytes
# are amortised over them, and FSDP divides params and tokens by the same GPU count).
ROOFLINE_CONFIGS = {"small": ("small", 32 * 512), "mixtral-8x7b": ("mixtral-8x7b", 2**20),
                    "llama4-scout": ("llama4-scout", 2**20)}
ROOFLINE_COLUMNS = ("config", "recipe", "gemm_us_per_token", "memory_us_per_token", "step_us_per_token",
                    "frac_flops_fp8", "frac_flops_fp4", "speedup", "gemm_only_speedup", "bwd_gemm_speedup")


def roofline_table(configs: Sequence[str], recipes: Sequence[str],
                   hw: Hardware = B200) -> list[dict[str, Any]]:
    """Roofline rows per (config, recipe), with speedups over the same config's bf16 row."""
    from lowbit.config import load_config
    rows = []
    for name in configs:
        base, tokens = ROOFLINE_CONFIGS[name]
        cfg = load_config(base).model
        bf16 = roofline(cfg, "bf16", hw, tokens)
        for recipe in recipes:
            row = {"config": name, **roofline(cfg, recipe, hw, tokens)}
            row["speedup"] = bf16["step_us_per_token"] / row["step_us_per_token"]
            row["gemm_only_speedup"] = bf16["gemm_us_per_token"] / row["gemm_us_per_token"]
            row["bwd_gemm_speedup"] = bf16["bwd_gemm_s"] / row["bwd_gemm_s"]
            rows.append(row)
    return rows


def print_roofline(rows: Sequence[dict[str, Any]]) -> str:
    cols = ROOFLINE_COLUMNS
    text = ["  ".join(f"{c:>18}" if i > 1 else f"{c:<14}" for i, c in enumerate(cols))]
    for row in rows:
        cells = [f"{row[c]:>18.3f}" if isinstance(row[c], float) else f"{row[c]:<14}" for c in cols]
        text.append("  ".join(cells))
    out = "\n".join(text)
    print(out, flush=True)
    return out


# ----------------------------------------------------------------------------- command line
def add_step_parser(subparsers: Any) -> None:
    from lowbit.bench_gemm import add_common_args, add_quantize_impls_arg
    p = subparsers.add_parser("step", help="train-step time per recipe (lowbit.train's step), vs bf16")
    add_common_args(p)
    p.add_argument("--configs", default="small", help=f"comma list of {sorted(STEP_CONFIGS)}")
    p.add_argument("--recipes", default=",".join(STEP_RECIPES), help="comma list (bf16 always runs first)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--backend", default="auto", choices=("auto", "emulate", "fp8", "native"))
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. --override global_batch_size=16 (repeatable)")
    p.add_argument("--tokens", choices=STEP_TOKENS, default="random",
                   help="random: uniform token ids; data: the config's first training batch (real text)")
    p.add_argument("--isolate", choices=("process", "none"), default="process",
                   help="process: each (config, recipe) in its own process (per-recipe peak memory)")
    add_quantize_impls_arg(p)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=bench_step, columns=STEP_COLUMNS)


def add_roofline_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("roofline", help="B200 step-time projection per recipe (no device needed)")
    p.add_argument("--configs", default=",".join(ROOFLINE_CONFIGS))
    p.add_argument("--recipes", default=",".join(STEP_RECIPES))
    p.add_argument("--json", default=None)
    p.set_defaults(func=None, columns=ROOFLINE_COLUMNS)


SUBCOMMANDS = {"step": add_step_parser, "roofline": add_roofline_parser}


def run_and_report(args: argparse.Namespace) -> int:
    if args.command == "roofline":
        rows = roofline_table(parse_list(args.configs), parse_list(args.recipes))
        print_roofline(rows)
        if args.json:
            payload = {"hardware": dataclasses.asdict(B200), "rows": rows}
            Path(args.json).write_text(json.dumps(payload, indent=1))
        return 0
    if getattr(args, "worker_out", None):
        return _worker(args)
    runner = args.func(args)
    runner.write()
    print("\n" + runner.table(args.columns), flush=True)
    if args.size != "tiny":
        print("\nB200 roofline projection (docs/roofline.md):")
        print_roofline(roofline_table(list(ROOFLINE_CONFIGS), parse_list(args.recipes)))
    print(f"\nJSON: {runner.json_path}  ({runner.elapsed():.0f} s)")
    return 0 if any(r.get("status") == "ok" for r in runner.rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("python -m lowbit.bench_step", __doc__, SUBCOMMANDS, run_and_report, argv)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
