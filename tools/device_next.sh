#!/usr/bin/env bash
# The GPU work left open after the 2026-11-23 sessions, one device call (<= 10 min) per mode.
#   tools/device_next.sh finish-study   nvfp4 + nvfp4-all-fp4 of the convergence study (H200, as the
#                                       other seven in docs/convergence/); results -> $OUT/study.tgz
#   tools/device_next.sh perf           (1) train loop vs bench step at the same batch: where the fixed
#                                       ~0.1 s/step of the study comes from; (2) bench gemm with the XLA
#                                       quantize vs the fused kernel; (3) bench step, every recipe
# Start each call with the wheel install of docs/benchmarks.md (grain etc.) and carry .whl.
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
log="$out/$1.log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log" | tail -n 25; }
case "$1" in
  finish-study)
    export LOWBIT_QUANTIZE_IMPL=xla  # as the seven stored runs (the fused kernel gives the same bits)
    root=/tmp/study; rm -rf "$root"; mkdir -p "$root"
    cp -r docs/convergence/. "$root"/ && rm -rf "$root/nvfp4" "$root"/summary.* "$root"/*.png
    run timeout 560 python3 -m lowbit.study --config small --steps 1000 --workdir "$root" --jobs 2 \
      --take-turns checkpoint_every=0 compilation_cache_dir=/tmp/xla_cache
    (cd "$root" && tar czf "$out/study.tgz" --exclude=checkpoints --exclude=xla_cache .)
    ;;
  perf)
    common=(global_batch_size=32 eval_every=0 checkpoint_every=0 log_every=10 compilation_cache_dir=/tmp/xla_cache)
    run timeout 120 python3 -m lowbit.train --recipe bf16 --config small --steps 100 --workdir /tmp/loop-a "${common[@]}"
    XLA_PYTHON_CLIENT_PREALLOCATE=false run timeout 120 python3 -m lowbit.train --recipe bf16 --config small \
      --steps 100 --workdir /tmp/loop-b "${common[@]}"
    for d in /tmp/loop-a /tmp/loop-b; do
      echo "$d step_time_s: $(grep -o '"step_time_s": [0-9.]*' $d/metrics.jsonl | tail -5 | cut -d' ' -f2 | tr '\n' ' ')" | tee -a "$log"
    done
    run timeout 100 python3 -m lowbit.bench step --configs small --recipes bf16 --override global_batch_size=32 \
      --json "$out/step_b32.json"
    LOWBIT_QUANTIZE_IMPL=xla run timeout 110 python3 -m lowbit.bench gemm --recipes mxfp8,nvfp4,mxfp4 --shapes 1 \
      --json "$out/gemm_xla.json"
    LOWBIT_QUANTIZE_IMPL=auto run timeout 110 python3 -m lowbit.bench gemm --recipes mxfp8,nvfp4,mxfp4 --shapes 1 \
      --json "$out/gemm_fused.json"
    run timeout 150 python3 -m lowbit.bench step --configs small --recipes fp8,mxfp8,nvfp4,mxfp4 \
      --time-budget-s 120 --json "$out/step_small.json"
    ;;
  *) echo "usage: $0 finish-study|perf" >&2; exit 2 ;;
esac
