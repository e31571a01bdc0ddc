"""Deviceless ahead-of-time compilation of lowbit's `native` GEMMs for a Blackwell (sm_100) target.

Run on the GPU machine (any CUDA jaxlib; no Blackwell needed):
    python tools/blackwell_aot.py [--out DIR] [--size 4096]
It builds a compile-only "B200" device from the attached GPU's target-config text proto with the
compute capability set to 10.0 and core_count 148 (jax.experimental.topologies.get_topology_desc,
as /work/shared/tools/jax_lowp_probe.py), compiles lowbit.dot_general(recipe, backend="native")
for MXFP8 and NVFP4 (forward, and forward+backward) and raw jax.nn.scaled_matmul anchors (MXFP8, and
MXFP4, which XLA does not send to cuDNN), and
prints the custom-call targets of each optimized HLO: `__cudnn$blockScaledDot` means the
block-scaled GEMM reaches cuDNN. HLO texts and excerpts go to --out (default $OUT, else
/tmp/blackwell_aot); a summary JSON too. On a machine without CUDA it says so and exits 2.
The attached target config is read through jax's internal xla_client (there is no public API
for it); if that fails, an embedded B200 description is used instead (stated in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

B200_SPEC = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 148
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 7672320000000
  l2_cache_size: 132644864
  clock_rate_ghz: 1.965
  device_memory_size: 191514411008
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 10 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 10.0a"
  device_address_bits: 64
  name: "NVIDIA B200"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA B200"
"""
BLOCK_SCALED_TARGET = "__cudnn$blockScaledDot"


def patch_to_sm100(text: str) -> str:
    """The attached GPU's GpuTargetConfigProto text with compute capability 10.0 and 148 SMs."""
    def fix_cc(match: re.Match) -> str:
        block = re.sub(r"major:\s*\d+", "major: 10", match.group(0))
        return re.sub(r"minor:\s*\d+", "minor: 0", block)
    text = re.sub(r"cuda_compute_capability\s*\{[^}]*\}", fix_cc, text)
    text = re.sub(r"core_count:\s*\d+", "core_count: 148", text)
    text = re.sub(r"Compute Capability \d+\.\d+", "Compute Capability 10.0", text)
    text = re.sub(r'(\bname:\s*")[^"]*(")', r"\1NVIDIA B200\2", text)
    return re.sub(r'(device_description_str:\s*")[^"]*(")', r"\1NVIDIA B200\2", text)


def attached_target_config(jax: Any) -> tuple[str | None, str]:
    """(target-config text of the attached GPU, how it was read) or (None, why not)."""
    try:
        from jax._src.lib import xla_client  # internal: no public accessor for the target config
        config = xla_client.get_topology_for_devices(jax.devices()).target_config
        return (config.decode() if isinstance(config, bytes) else config), "attached GPU's target config"
    except Exception as error:
        return None, f"attached target config unreadable ({type(error).__name__}: {error})"


def custom_call_targets(hlo: str) -> list[str]:
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def excerpt(hlo: str) -> str:
    """The custom-call / dot lines of an optimized HLO module (metadata stripped)."""
    lines = []
    for line in hlo.splitlines():
        if re.search(r"custom-call\(|\bdot\(|scaled-dot\(", line):
            lines.append(re.sub(r", metadata=\{[^}]*\}", "", line.strip())[:600])
    return "\n".join(lines)


def variants(size: int) -> dict[str, tuple[Any, list[Any]]]:
    """name -> (function, abstract argument specs without sharding)."""
    import jax
    import jax.numpy as jnp

    import lowbit

    bf16 = jnp.bfloat16
    tn = (((1,), (1,)), ((), ()))
    x = jax.ShapeDtypeStruct((size, size), bf16)
    w = jax.ShapeDtypeStruct((size, size), bf16)  # stored (N, K): contracting dim last
    dy = jax.ShapeDtypeStruct((size, size), bf16)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    out = {}
    for recipe in ("mxfp8", "nvfp4"):  # mxfp4: lowbit's native backend refuses it (the anchor below says why)
        dot = lowbit.dot_general(recipe, backend="native")

        def forward(x, w, key_data, dot=dot):
            return dot(x, w, tn, preferred_element_type=bf16, key=jax.random.wrap_key_data(key_data))

        def fwd_bwd(x, w, dy, key_data, forward=forward):
            y, pullback = jax.vjp(lambda a, b: forward(a, b, key_data), x, w)
            return (y, *pullback(dy))

        out[f"lowbit native {recipe} fwd"] = (forward, [x, w, key])
        out[f"lowbit native {recipe} fwd+bwd"] = (fwd_bwd, [x, w, dy, key])
    e4m3, e8m0 = jnp.float8_e4m3fn, jnp.float8_e8m0fnu
    out["anchor jax.nn.scaled_matmul mxfp8"] = (
        lambda a, b, sa, sb: jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=bf16),
        [jax.ShapeDtypeStruct((1, size, size), e4m3), jax.ShapeDtypeStruct((1, size, size), e4m3),
         jax.ShapeDtypeStruct((1, size, size // 32), e8m0),
         jax.ShapeDtypeStruct((1, size, size // 32), e8m0)])
    # MXFP4 (E2M1 data, E8M0 scales per 32): the seventh session found XLA dequantizes it (no cuDNN call).
    e2m1 = jnp.float4_e2m1fn
    out["anchor jax.nn.scaled_matmul mxfp4"] = (
        lambda a, b, sa, sb: jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=bf16),
        [jax.ShapeDtypeStruct((1, size, size), e2m1), jax.ShapeDtypeStruct((1, size, size), e2m1),
         jax.ShapeDtypeStruct((1, size, size // 32), e8m0),
         jax.ShapeDtypeStruct((1, size, size // 32), e8m0)])
    return out


def compile_for(fn: Any, specs: list[Any], sharding: Any) -> tuple[str, dict[str, Any]]:
    """Optimized HLO of fn for the compile-only device (autotuning off if the default compile fails)."""
    import jax
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in specs]
    info: dict[str, Any] = {}
    last_error = None
    for options in (None, {"xla_gpu_autotune_level": 0}):
        try:
            t0 = time.perf_counter()
            lowered = jax.jit(fn).trace(*args).lower()
            compiled = lowered.compile(options) if options else lowered.compile()
            info.update(compile_s=round(time.perf_counter() - t0, 1), compile_options=options)
            return compiled.as_text() or "", info
        except Exception as error:
            last_error = error
            label = "error" if options is None else "error_autotune0"
            info[label] = f"{type(error).__name__}: {error}"[:3000]
    raise RuntimeError(info) from last_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/blackwell_aot"))
    parser.add_argument("--size", type=int, default=4096, help="M = K = N (multiple of 64)")
    args = parser.parse_args(argv)

    import jax
    from jax.experimental import topologies

    platform = jax.devices()[0].platform
    if platform not in ("gpu", "cuda"):
        print(f"blackwell_aot: needs a CUDA jaxlib (this jax runs on platform {platform!r}); run it on the "
              "GPU machine: python tools/blackwell_aot.py", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    attached, source = attached_target_config(jax)
    target = patch_to_sm100(attached) if attached else B200_SPEC
    source = f"{source}, patched to cc 10.0 / 148 SMs" if attached else f"{source}; embedded B200 spec used"
    (out_dir / "sm100_target_config.txtpb").write_text(target)
    print(f"target config: {source}")
    summary: dict[str, Any] = {"target_config_source": source, "jax": jax.__version__,
                               "attached_device": str(jax.devices()[0]), "variants": {}}
    topology = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
    print(f"compile-only devices: {[str(d) for d in topology.devices]}")
    mesh = jax.sharding.Mesh(topology.devices, ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    found_any = False
    for name, (fn, specs) in variants(args.size).items():
        entry: dict[str, Any] = {}
        try:
            hlo, info = compile_for(fn, specs, sharding)
            entry.update(info)
            entry["custom_calls"] = custom_call_targets(hlo)
            entry["block_scaled_dots"] = hlo.count(f'custom_call_target="{BLOCK_SCALED_TARGET}"')
            found_any |= entry["block_scaled_dots"] > 0
            stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
            (out_dir / f"{stem}.hlo.txt").write_text(hlo)
            (out_dir / f"{stem}.excerpt.txt").write_text(excerpt(hlo))
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"[:4000]
        summary["variants"][name] = entry
        status = entry.get("error", "").splitlines()[0][:200] if "error" in entry else (
            f"{entry['block_scaled_dots']} x {BLOCK_SCALED_TARGET}; custom calls {entry['custom_calls']}")
        print(f"{name:<38} {status}", flush=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{BLOCK_SCALED_TARGET} {'found' if found_any else 'NOT found'}; HLO and excerpts in {out_dir}")
    return 0 if found_any else 1


if __name__ == "__main__":
    sys.exit(main())
