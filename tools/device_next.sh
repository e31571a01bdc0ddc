#!/usr/bin/env bash
# The GPU work left open after the fourth 2026-11-23 session, one device call (<= 10 min) per mode.
# Start each call with the wheel install of docs/benchmarks.md (grain etc.) and carry .whl.
#   tools/device_next.sh fp8acc   the Pallas grouped GEMM with FP8 operands (0.32x cuBLAS FP8 so far):
#                                 jax's Pallas lowering leaves Triton's maxNumImpreciseAcc at 0, promoting
#                                 every WGMMA; time it at the default, 128 (DeepSeek-V3) and 2^30
#                                 (lowbit.kernels.triton_fp8_acc), then bench grouped fp8 with the best
#   tools/device_next.sh step     bench step with moe_impl=pallas for the quantized recipes (bf16 with it:
#                                 1.06-1.08x over capacity; fp8 slower), small and moe-1.8b
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
log="$out/$1.log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | grep -v "^\[ " | tee -a "$log" | tail -n 25; }
case "$1" in
  profile)  # fifth session: FP8 accumulation speed + accuracy, fp8 quantize share, moe-1.8b step by kernel kind
    for acc in "" 128 1073741824; do
      run timeout 70 python3 tools/grouped_tiles.py --kernels fp8-fprop --tiles 128:128:256:8:3,128:128:128:8:3 \
        --accuracy ${acc:+--fp8-imprecise-acc $acc} --json "$out/fp8acc_${acc:-default}.json"
    done
    run timeout 100 python3 -m lowbit.bench gemm --recipes fp8 --shapes 1 --refs bf16,fp8 \
      --json "$out/gemm_fp8_floor.json"
    for recipe in bf16 fp8; do
      run timeout 130 python3 tools/step_gap.py --config moe-1.8b --recipe $recipe --steps 3 --train-steps 0 \
        --trace /tmp/tr_$recipe --top 25
    done
    ;;
  profile2)  # FP8 accumulation (fixed accuracy check), fp8 step kernels with their HLO source, cuDNN attention
    for acc in "" 128 1073741824; do
      run timeout 60 python3 tools/grouped_tiles.py --kernels fp8-fprop --tiles 128:128:256:8:3,128:128:128:8:3 \
        --accuracy ${acc:+--fp8-imprecise-acc $acc} --json "$out/fp8acc_${acc:-default}.json"
    done
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
      run timeout 150 python3 tools/step_gap.py --config moe-1.8b --recipe fp8 --steps 3 --train-steps 0 \
      --trace /tmp/tr_fp8 --top 45 --hlo-dir /tmp/dump --kernels-tsv "$out/kernels_moe18b_fp8.tsv"
    run timeout 200 python3 -m lowbit.bench step --configs moe-1.8b --recipes bf16,fp8 \
      --override attention_impl=cudnn --time-budget-s 190 --json "$out/step_moe18b_cudnn.json"
    ;;
  final5)  # FP8 accumulation speed + accuracy (one process), small step with attention auto, grouped fp8 at 2^30
    run timeout 200 python3 tools/grouped_tiles.py --configs e8k2,e64k8 --kernels fp8-fprop --tiles 128:128:256:8:3 \
      --accuracy --fp8-imprecise-acc none,128,1073741824 --json "$out/fp8acc.json"
    run timeout 170 python3 -m lowbit.bench step --configs small --recipes bf16,fp8 --time-budget-s 160 \
      --json "$out/step_small_auto_attention.json"
    LOWBIT_FP8_MAX_IMPRECISE_ACC=1073741824 run timeout 120 python3 -m lowbit.bench grouped --configs e8k2,e64k8 \
      --variants dense,pallas --dtypes fp8 --pallas-tiles 128:128:256:8:3 --json "$out/grouped_fp8_acc2p30.json"
    ;;
  fp8acc)
    run timeout 100 python3 tools/grouped_tiles.py --kernels fp8-fprop --json "$out/fp8acc_default.json"
    run timeout 100 python3 tools/grouped_tiles.py --kernels fp8-fprop --fp8-imprecise-acc 128 \
      --json "$out/fp8acc_128.json"
    run timeout 100 python3 tools/grouped_tiles.py --kernels fp8-fprop --fp8-imprecise-acc 1073741824 \
      --json "$out/fp8acc_2p30.json"
    # accuracy of each setting against a float64 reference still to add before any default changes
    LOWBIT_FP8_MAX_IMPRECISE_ACC=128 run timeout 150 python3 -m lowbit.bench grouped --configs e8k2,e64k8 \
      --variants dense,ragged_dot,pallas --dtypes fp8 --pallas-tiles 128:128:256:8:3 \
      --json "$out/grouped_fp8_acc128.json"
    ;;
  step)
    for impl in capacity pallas; do
      run timeout 200 python3 -m lowbit.bench step --configs small --recipes mxfp8,nvfp4 --override moe_impl=$impl \
        --cache-dir /tmp/xla_cache --time-budget-s 190 --json "$out/step_small_mx_$impl.json"
    done
    run timeout 160 python3 -m lowbit.bench step --configs moe-1.8b --recipes mxfp8 --override moe_impl=pallas \
      --time-budget-s 150 --json "$out/step_moe18b_mxfp8_pallas.json"
    ;;
  *) echo "usage: $0 profile|profile2|final5|fp8acc|step" >&2; exit 2 ;;
esac
