#!/usr/bin/env bash
# The GPU work left open after the third 2026-11-23 session, one device call (<= 10 min) per mode.
# Start each call with the wheel install of docs/benchmarks.md (grain etc.) and carry .whl.
#   tools/device_next.sh kernels   (1) bench gemm, every recipe, XLA quantize vs the fused kernel, which
#                                  now also takes stochastic rounding (FP4 recipes' gradients);
#                                  (2) bench grouped with the one-launch Pallas grouped GEMM, a tile sweep
#   tools/device_next.sh step      bench step: small (every recipe, fused quantize), small with
#                                  moe_impl=pallas, and moe-1.8b (the largest MoE step config on one H100)
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
log="$out/$1.log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log" | tail -n 25; }
case "$1" in
  kernels)
    for impl in xla auto; do
      LOWBIT_QUANTIZE_IMPL=$impl run timeout 110 python3 -m lowbit.bench gemm --recipes fp8,mxfp8,nvfp4,mxfp4 \
        --shapes 1 --json "$out/gemm_$impl.json"
    done
    run timeout 330 python3 -m lowbit.bench grouped --size full --configs e8k2,e64k8 \
      --variants dense,ragged_dot,grouped,pallas \
      --pallas-tiles 128:64:128:4:3,128:64:256:8:3,64:64:128:4:4 --json "$out/grouped_pallas.json"
    ;;
  step)
    run timeout 300 python3 -m lowbit.bench step --configs small --tokens data --time-budget-s 290 \
      --cache-dir /tmp/xla_cache --json "$out/step_small.json"
    run timeout 120 python3 -m lowbit.bench step --configs small --recipes bf16 --override moe_impl=pallas \
      --json "$out/step_small_pallas.json"
    run timeout 160 python3 -m lowbit.bench step --configs moe-1.8b --recipes bf16,fp8,mxfp8 \
      --time-budget-s 150 --json "$out/step_moe18b.json"
    ;;
  *) echo "usage: $0 kernels|step" >&2; exit 2 ;;
esac
