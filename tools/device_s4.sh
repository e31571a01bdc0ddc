#!/usr/bin/env bash
# Fourth-session GPU call: the Pallas grouped GEMM with per-kernel tuned tiles, and the MoE step with it.
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
log="$out/s4.log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | grep -v "^\[ " | tee -a "$log" | tail -n 30; }
run timeout 110 python3 -m lowbit.bench grouped --configs e8k2,e64k8 --variants dense,capacity,pallas \
  --passes fwd,fwd+bwd --dtypes bf16 --json "$out/grouped_tuned.json"
run timeout 70 python3 tools/grouped_tiles.py --kernels wgrad --json "$out/tiles_wgrad.json"
for impl in capacity pallas; do
  run timeout 60 python3 -m lowbit.bench step --configs small --recipes bf16 --override moe_impl=$impl \
    --json "$out/step_small_bf16_$impl.json"
done
run timeout 90 python3 tools/step_gap.py --config small --recipe bf16 --steps 5 --train-steps 2 --trace /tmp/tr \
  --top 40 moe_impl=pallas
run timeout 130 python3 -m lowbit.bench step --configs small --recipes fp8 --override moe_impl=pallas \
  --json "$out/step_small_fp8_pallas.json"
