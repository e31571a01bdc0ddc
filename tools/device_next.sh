#!/usr/bin/env bash
# The GPU work of the tenth (2026-12-03) session and what is left, one device call (<= 10 min) per mode.
#   tools/device_next.sh fp4enc2   the magic-add encoder and NVFP4's E4M3 scale by the FP8 convert: parity on the
#                                  GPU (every midpoint), then every FP4 quantize variant side by side
#   tools/device_next.sh fp4layers the magic add as auto: quantize kernels, MX linear layers (xla vs auto), and
#                                  the embedding gradient (scatter vs one-hot GEMM chunked along the token axis)
#   tools/device_next.sh embed32   the float32 scatter-add embedding gradient (new default) vs bf16 and the GEMM,
#                                  then moe-2.8b bf16 vs fp8-delayed on the H200 (random tokens)
#   tools/device_next.sh prof28    the moe-2.8b step's GPU kernels, bf16 and fp8-delayed (where fp8's time goes)
#   tools/device_next.sh casttiles the FP8 cast(+transpose) kernel's tiles on the H200, scaled (delayed) casts of
#                                  the moe-2.8b step's operands included
#   tools/device_next.sh casttiles2 the same with the transposed copy stored 4 codes per int32 word
#   tools/device_next.sh packstep  moe-2.8b bf16 and fp8-delayed with the packed 128x64 cast as default
# The fifteenth session's (2026-12-08):
#   tools/device_next.sh mosaic1   the Mosaic GPU grouped GEMM forward (lowbit.kernels.grouped_mosaic): GPU bit check,
#                                  then FP8 and bf16 vs dense and the Triton Pallas kernel at e8k2 / e64k8
#   tools/device_next.sh mosaic2   the bit check again and moe-1.8b fp8 with moe_impl=pallas: the
#                                  forward grouped GEMMs on the Mosaic kernel vs Triton (LOWBIT_GROUPED_FP8)
#   tools/device_next.sh mosaic3   the Mosaic FP8 kernel with N-block bands (rhs[e] columns kept in L2 across row tiles)
# The thirteenth session's (2026-12-04):
#   tools/device_next.sh head13    HEAD (the dequantize kernel sharing the quantize kernel's helpers) on the GPU:
#                                  FP8 cast parity, every quantize kernel and the block values with their bits checked
#   tools/device_next.sh xladelay  moe-2.8b fp8-delayed with XLA's quantize vs the cast kernel (bf16 in the same run):
#                                  with the scale known before the operand, can XLA fuse the cast into its producer?
# The twelfth session's (2026-12-04):
#   tools/device_next.sh words     the quantize kernel's codes stored as int32 words vs bytes (every format, two
#                                  interleaved rounds, bits checked), a word tile sweep, and the MX linear layers
#                                  with each store ($LOWBIT_QUANTIZE_STORE, one process each, bf16 in both)
#   tools/device_next.sh words2    the word store's FP4 tiles and warps
#   tools/device_next.sh words3    the standard quantize table with the new FP4 defaults
#   tools/device_next.sh casttiles3 taller tiles for the FP8 scaled cast+transpose (moe-2.8b operands)
#   tools/device_next.sh mxfinal   the FP4 linear layers and the moe-1.8b nvfp4/mxfp4 steps with the new defaults
#   tools/device_next.sh values    the emulated GEMM's operands as block values from the kernel: kernel rows, then the
#                                  MX layers with LOWBIT_QUANTIZE_VALUES=0 / 1 / 1 without XLA's Triton GEMMs
#   tools/device_next.sh values2   the same with the residuals' block values from the dequantize kernel, then the
#                                  moe-1.8b nvfp4 and mxfp8 steps
#   tools/device_next.sh mxsteps   bench step small mxfp4/nvfp4, once per store
# The ninth session's modes:
#   tools/device_next.sh delayed   delayed scaling: scaled-cast parity on the GPU, the fp8 linear layer and the
#                                  moe-1.8b step, fp8 vs fp8-delayed (bf16 in the same runs)
#   tools/device_next.sh delayed2  fp8-delayed vs fp8 at moe-2.8b and small, and 200 training steps of small
# Done in the eighth session (docs/benchmarks.md "Eighth session"): fp8cast, fp8prof, convert, fp4enc, bigsmall,
# embedgrad.
# Start each call with the wheel install of docs/benchmarks.md (grain etc.) and carry .whl. grain needs array_record
# on Linux; its cp312 wheel is tagged manylinux2014: pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 array_record==0.8.6 -d .whl
# Done in the seventh session (docs/benchmarks.md): fp8 cast variants (tools/fp8_cast_study.py, in git at
# fa12517 and c26312d; all reverted), moe-1.8b bf16/mxfp4/fp8 (`steps4` with fp8), Blackwell AOT with mxfp4
# (mxfp4 is not a native format), and the FP8 tile sweep (the first half of `fp8pallas`).
# Done in the sixth session: moe-1.8b bf16/nvfp4/mxfp8, moe-2.8b bf16/fp8 (`big`), and issue 4's two-GPU runs
# (`multi`..`multi4`, nvidia-h200-x2).
#   tools/device_next.sh fp8cast   fp8 with the cast(+transpose) kernel vs the XLA quantize: parity on the GPU,
#                                  the linear layer at 16384x4096x14336, and the moe-1.8b step (with bf16)
#   tools/device_next.sh fp8prof   the fp8 linear layer's kernels (XLA quantize vs cast kernel, both weight layouts)
#                                  and the moe-1.8b fp8 step's kernels with the cast kernel
#   tools/device_next.sh convert   the FP8 convert encoder: parity, quantize kernels, fp8/mxfp8 layer and fp8 step
#   tools/device_next.sh fp4enc    E2M1 by compares: parity, quantize kernels, MX layers (xla vs auto), MX steps
#   tools/device_next.sh bigsmall  fp8 vs bf16 steps at moe-2.8b and small, with the cast kernel
#   tools/device_next.sh embedgrad moe-1.8b with the embedding gradient as a one-hot GEMM (random and real tokens)
#   tools/device_next.sh steps     bench step moe-1.8b bf16, fp8, mxfp8 with cuDNN attention and per-sequence
#                                  capacity
#   tools/device_next.sh steps4    the same for bf16, nvfp4, mxfp4
#   tools/device_next.sh big       moe-2.8b bf16 and fp8 (sixth session: fp8 1.05x bf16)
#   tools/device_next.sh fp8pallas the FP8 Pallas grouped GEMM's tile sweep at maxNumImpreciseAcc 128 (seventh
#                                  session: best 0.61x dense FP8), then the fp8 step with moe_impl=pallas (not run)
#   tools/device_next.sh profile   the moe-1.8b fp8 step's kernels with their HLO source (cuDNN attention): how
#                                  many ms/step the amax reductions take, i.e. what delayed scaling could save
#   tools/device_next.sh multi     issue 4 on nvidia-h200-x2: the small config trained on two GPUs (fsdp=2, then
#                                  a resume, nvfp4, one GPU for scale, data=2 and expert=2 meshes)
#   tools/device_next.sh multi2    nvidia-h200-x2: step_gap on one GPU and fsdp=2 at batch 32 and 128
#   tools/device_next.sh multi3    nvidia-h200-x2: the fsdp=2 step's kernels, and a dense model on 1 and 2 GPUs
#   tools/device_next.sh multi4    nvidia-h200-x2: one GPU vs fsdp=2 vs data=2 after the per-sequence dispatch
# Modes that docs/ cite from earlier sessions (kernels, perf, fp8acc, finish-study, ...) are in git history.
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
log="$out/$1.log"
run() { echo "+ $*" | tee -a "$log"; "$@" 2>&1 | grep -v "^\[ " | tee -a "$log" | tail -n 25; }
case "$1" in
  mosaic3)  # fifteenth session (written after the budget ran out): the Mosaic FP8 kernel's raster bands at e8k2 / e64k8
    run timeout 200 python3 -m lowbit.bench grouped --configs e8k2,e64k8 --variants dense,mosaic --dtypes fp8 \
      --passes fwd --mosaic-tiles 128:128:128:4:ws,128:128:128:4:ws:b8,128:128:128:4:ws:b4,128:128:128:4:ws:b2,128:128:128:3:ws:b4 \
      --cache-dir /tmp/xla_cache --time-budget-s 180 --json "$out/grouped_mosaic_bands_s15.json"
    ;;
  mosaic2)  # fifteenth session: the bit check again (M % 8 padded, NaN-safe zero rows) and the moe-1.8b
           # step with moe_impl=pallas: fp8's forward grouped GEMMs on the Mosaic kernel (auto) vs on Triton
    run timeout 170 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8 --override moe_impl=pallas \
      --cache-dir /tmp/xla_cache --time-budget-s 160 --json "$out/step_moe18b_pallas_mosaic_s15.json"
    run timeout 100 python3 tools/grouped_mosaic_check.py
    LOWBIT_GROUPED_FP8=triton run timeout 120 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8 \
      --override moe_impl=pallas --cache-dir /tmp/xla_cache --time-budget-s 110 \
      --json "$out/step_moe18b_pallas_triton_s15.json"
    ;;
  mosaic1)  # fifteenth session: the Mosaic GPU grouped GEMM (TMA + WGMMA): bits on the GPU, then FP8 and bf16 forward
    run timeout 150 python3 tools/grouped_mosaic_check.py
    run timeout 200 python3 -m lowbit.bench grouped --configs e8k2,e64k8 --variants dense,pallas,mosaic --dtypes fp8 \
      --passes fwd --pallas-tiles 128:128:256:8:3 --mosaic-tiles 128:128:128:4:ws,128:128:128:3:ws,128:128:128:4,128:128:128:6,64:256:128:4 \
      --cache-dir /tmp/xla_cache --time-budget-s 180 --json "$out/grouped_mosaic_fp8_s15.json"
    run timeout 150 python3 -m lowbit.bench grouped --configs e8k2,e64k8 --variants dense,pallas,mosaic --dtypes bf16 \
      --passes fwd --mosaic-tiles 128:128:64:4:ws,128:128:64:4 \
      --cache-dir /tmp/xla_cache --time-budget-s 130 --json "$out/grouped_mosaic_bf16_s15.json"
    ;;
  head13)  # thirteenth session: the GPU check of HEAD's kernels (bits) and their times
    run timeout 120 python3 tools/fp8_cast_parity.py --json "$out/parity_s13.json"
    run timeout 110 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 90
    run timeout 110 python3 tools/bench_quantize_kernels.py --values-only --budget-s 90
    ;;
  xladelay)  # thirteenth session: delayed scaling with XLA's quantize (multiply + convert) vs the cast kernel
    run timeout 420 python3 -m lowbit.bench step --configs moe-2.8b --recipes fp8-delayed --quantize-impls xla,auto \
      --cache-dir /tmp/xla_cache --time-budget-s 400 --json "$out/step_moe28b_xladelay_s13.json"
    ;;
  words2)  # twelfth session: the word store's tiles for FP4, then the small step's MX recipes with each store
    run timeout 150 python3 tools/bench_quantize_kernels.py --stores-only --store-rounds 1 --budget-s 130 \
      --sweep-formats "mxfp4,mxfp4 rceil,nvfp4,nvfp4 16x16" \
      --word-tiles 16x512w8,16x512w4,8x512w4,16x256w4,8x256w4,32x256w4,16x128w4,32x128w4,8x256w2,16x256w8
    ;;
  casttiles3)  # twelfth session: taller tiles for the scaled cast+transpose (its transposed rows are bm bytes long)
    run timeout 200 python3 tools/bench_fp8_cast.py --scaled-only --json "$out/bench_fp8_cast_tiles_s12.json" \
      --scaled-tiles 128x64w8p,256x64w8p,256x64w4p,256x32w8p,256x32w4p,128x32w4p,256x128w8p,512x32w8p,128x64w8p
    ;;
  values2)  # twelfth session: with the residuals' block values from the dequantize kernel too; then MX steps
    run timeout 100 python3 tools/bench_quantize_kernels.py --values-only --budget-s 85
    for v in 1 0; do
      LOWBIT_QUANTIZE_VALUES=$v run timeout 110 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 \
        --refs none --cache-dir /tmp/xla_cache --time-budget-s 100 --json "$out/gemm_mx_values2_$v.json"
    done
    run timeout 250 python3 -m lowbit.bench step --configs moe-1.8b --recipes nvfp4,mxfp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 235 --json "$out/step_moe18b_values_s12.json"
    ;;
  values)  # twelfth session: the emulated GEMM's bf16 operands written by the quantize kernel (no codes)
    run timeout 110 python3 tools/bench_quantize_kernels.py --values-only --budget-s 95
    for v in 0 1; do
      LOWBIT_QUANTIZE_VALUES=$v run timeout 110 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 \
        --refs none --cache-dir /tmp/xla_cache --time-budget-s 100 --json "$out/gemm_mx_values$v.json"
    done
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false LOWBIT_QUANTIZE_VALUES=1 run timeout 110 python3 -m lowbit.bench \
      gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 --refs none --time-budget-s 100 --json "$out/gemm_mx_values1_cublas.json"
    ;;
  mxfinal)  # twelfth session: FP4 layers and the moe-1.8b MX steps with the new FP4 kernel defaults
    run timeout 100 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp4,nvfp4 --refs none \
      --cache-dir /tmp/xla_cache --time-budget-s 90 --json "$out/gemm_fp4_s12.json"
    run timeout 440 python3 -m lowbit.bench step --configs moe-1.8b --recipes nvfp4,mxfp4 \
      --cache-dir /tmp/xla_cache --time-budget-s 420 --json "$out/step_moe18b_fp4_s12.json"
    ;;
  words3)  # twelfth session: the standard quantize table with the new FP4 defaults (words, 8x512 tiles, 4 warps)
    run timeout 110 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 90
    ;;
  mxsteps)  # twelfth session: the small step's MX recipes with each store (needs array_record's cp312 wheel)
    for st in bytes words; do
      LOWBIT_QUANTIZE_STORE=$st run timeout 210 python3 -m lowbit.bench step --configs small --recipes mxfp4,nvfp4 \
        --cache-dir /tmp/xla_cache --time-budget-s 200 --json "$out/step_small_mx_$st.json"
    done
    ;;
  words)  # twelfth session: int32-word stores in the quantize kernel (the FP8 cast's transposed copy gained 1.3x)
    run timeout 250 python3 tools/bench_quantize_kernels.py --stores-only --budget-s 230
    for st in bytes words; do
      LOWBIT_QUANTIZE_STORE=$st run timeout 150 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 \
        --refs none --cache-dir /tmp/xla_cache --time-budget-s 140 --json "$out/gemm_mx_$st.json"
    done
    ;;
  fp4enc2)  # tenth session: FP4 encoders (threshold, magic) and NVFP4's scale encoder (integer, convert)
    run timeout 240 python3 tools/fp8_cast_parity.py --json "$out/parity_fp4enc2.json"
    run timeout 200 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 180
    ;;
  embed32)  # tenth session: the scatter-add of the embedding gradient in float32; an H200 step reference
    run timeout 120 python3 tools/bench_embed_grad.py --json "$out/embed_grad32_s10.json"
    run timeout 380 python3 -m lowbit.bench step --configs moe-2.8b --recipes bf16,fp8-delayed \
      --cache-dir /tmp/xla_cache --time-budget-s 360 --json "$out/step_moe28b_h200_s10.json"
    ;;
  casttiles)  # tenth session: in the moe-2.8b fp8-delayed step the cast kernels ran at ~55% of copy bandwidth
    run timeout 300 python3 tools/bench_fp8_cast.py --json "$out/bench_fp8_cast_s10.json"
    ;;
  casttiles2)  # tenth session: 1-byte transposed stores ran at ~1.1 TB/s; 4-byte words
    run timeout 300 python3 tools/bench_fp8_cast.py --json "$out/bench_fp8_cast_pack_s10.json"
    ;;
  packstep)  # tenth session: the step with the packed-transpose cast kernel (H200)
    run timeout 300 python3 -m lowbit.bench step --configs moe-2.8b --recipes fp8-delayed \
      --cache-dir /tmp/xla_cache --time-budget-s 280 --json "$out/step_moe28b_packed_s10.json"
    ;;
  prof28)  # tenth session: kernel profiles of the moe-2.8b step, bf16 vs fp8-delayed, with their HLO sources
    for r in bf16 fp8-delayed; do
      rm -rf /tmp/dump
      XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
        run timeout 250 python3 tools/step_gap.py --config moe-2.8b --recipe $r --steps 3 --train-steps 0 \
        --trace /tmp/tr_$r --top 40 --hlo-dir /tmp/dump --kernels-tsv "$out/kernels_moe28b_$r.tsv"
    done
    ;;
  fp4layers)  # tenth session: the magic add as the auto encoder, in the kernels and the MX layers
    run timeout 150 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 130
    run timeout 150 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 --quantize-impls xla,auto \
      --refs none --cache-dir /tmp/xla_cache --time-budget-s 140 --json "$out/gemm_mx_s10.json"
    run timeout 120 python3 tools/bench_embed_grad.py --json "$out/embed_grad_s10.json"
    ;;
  delayed)  # ninth session: delayed scaling (amax histories; the cast kernel writes the amax, no pass before it)
    run timeout 220 python3 tools/fp8_cast_parity.py --json "$out/parity_delayed.json"
    run timeout 330 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8,fp8-delayed \
      --cache-dir /tmp/xla_cache --time-budget-s 315 --json "$out/step_moe18b_delayed.json"
    ;;
  delayedgemm)  # ninth session: the fp8 linear layer, fp8 vs fp8-delayed (run first, in the delayed call)
    run timeout 130 python3 -m lowbit.bench gemm --shapes 1 --recipes fp8,fp8-delayed --refs none \
      --cache-dir /tmp/xla_cache --time-budget-s 120 --json "$out/gemm_delayed.json"
    ;;
  delayed2)  # ninth session: fp8-delayed at the largest MoE config and small, then the small config trained
    run timeout 330 python3 -m lowbit.bench step --configs moe-2.8b --recipes fp8,fp8-delayed \
      --cache-dir /tmp/xla_cache --time-budget-s 315 --json "$out/step_moe28b_delayed.json"
    run timeout 200 python3 -m lowbit.bench step --configs small --recipes fp8,fp8-delayed \
      --cache-dir /tmp/xla_cache --time-budget-s 190 --json "$out/step_small_delayed.json"
    ;;
  fp8cast)  # eighth session: the cast(+transpose) kernel wired into lowbit.dot; XLA quantize vs the kernel
    run timeout 90 python3 tools/fp8_cast_parity.py --json "$out/fp8_cast_parity.json"
    run timeout 150 python3 -m lowbit.bench gemm --shapes 1 --recipes fp8 --quantize-impls xla,auto --refs fp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 140 --json "$out/gemm_fp8_cast.json"
    run timeout 330 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8 --quantize-impls xla,auto \
      --cache-dir /tmp/xla_cache --time-budget-s 310 --json "$out/step_moe18b_fp8_cast.json"
    ;;
  convert)  # eighth session: the FP8 convert in both kernels (fp8_cast default, MXFP8 auto), then the layer and step
    run timeout 100 python3 tools/fp8_cast_parity.py --json "$out/fp8_cast_parity.json"
    run timeout 100 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 80
    run timeout 130 python3 -m lowbit.bench gemm --shapes 1 --recipes fp8,mxfp8 --quantize-impls xla,auto --refs none \
      --cache-dir /tmp/xla_cache --time-budget-s 120 --json "$out/gemm_convert.json"
    run timeout 240 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8 --quantize-impls xla,auto \
      --cache-dir /tmp/xla_cache --time-budget-s 225 --json "$out/step_moe18b_fp8_convert.json"
    ;;
  fp4enc)  # eighth session: E2M1 by midpoint compares in the MX kernel; MX layers and steps after both encoders
    run timeout 100 python3 tools/fp8_cast_parity.py --json "$out/parity_fp4enc.json"
    run timeout 100 python3 tools/bench_quantize_kernels.py --no-sweep --budget-s 80
    run timeout 110 python3 -m lowbit.bench gemm --shapes 1 --recipes mxfp8,mxfp4,nvfp4 --quantize-impls xla,auto \
      --refs none --cache-dir /tmp/xla_cache --time-budget-s 100 --json "$out/gemm_mx_s8.json"
    run timeout 270 python3 -m lowbit.bench step --configs moe-1.8b --recipes mxfp8,nvfp4 \
      --cache-dir /tmp/xla_cache --time-budget-s 255 --json "$out/step_moe18b_mx_s8.json"
    ;;
  bigsmall)  # eighth session: fp8 with the cast kernel at the largest MoE config and at small
    run timeout 390 python3 -m lowbit.bench step --configs moe-2.8b --recipes fp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 370 --json "$out/step_moe28b_s8.json"
    run timeout 170 python3 -m lowbit.bench step --configs small --recipes fp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 160 --json "$out/step_small_s8.json"
    ;;
  embedgrad)  # eighth session: the token embedding's gradient as a one-hot GEMM instead of a scatter-add
    run timeout 200 python3 -m lowbit.bench step --configs moe-1.8b --recipes fp8 --override embed_grad=gemm \
      --cache-dir /tmp/xla_cache --time-budget-s 190 --json "$out/step_moe18b_embedgemm_s8.json"
    for g in scatter gemm; do
      run timeout 120 python3 -m lowbit.bench step --configs moe-1.8b --recipes bf16 --tokens data \
        --override embed_grad=$g --cache-dir /tmp/xla_cache --time-budget-s 110 --json "$out/step_moe18b_data_$g.json"
    done
    ;;
  fp8prof)  # where the fp8 linear layer and the moe-1.8b fp8 step go with the cast kernel
    run timeout 200 python3 tools/profile_fp8_linear.py --calls 10
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
      run timeout 250 python3 tools/step_gap.py --config moe-1.8b --recipe fp8 --steps 3 --train-steps 0 \
      --trace /tmp/tr_fp8 --top 45 --hlo-dir /tmp/dump --kernels-tsv "$out/kernels_moe18b_fp8_cast.tsv"
    ;;
  steps)
    run timeout 560 python3 -m lowbit.bench step --configs moe-1.8b --recipes bf16,fp8,mxfp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 540 --json "$out/step_moe18b_cudnn_mxfp8.json"
    ;;
  steps4)
    run timeout 560 python3 -m lowbit.bench step --configs moe-1.8b --recipes bf16,nvfp4,mxfp4 \
      --cache-dir /tmp/xla_cache --time-budget-s 540 --json "$out/step_moe18b_cudnn_fp4.json"
    ;;
  big)
    run timeout 400 python3 -m lowbit.bench step --configs moe-2.8b --recipes bf16,fp8 \
      --cache-dir /tmp/xla_cache --time-budget-s 380 --json "$out/step_moe28b.json"
    ;;
  fp8pallas)
    run timeout 150 python3 tools/grouped_tiles.py --configs e8k2,e64k8 --kernels fp8-fprop \
      --json "$out/fp8_tiles_acc128.json"
    for impl in capacity pallas; do
      run timeout 190 python3 -m lowbit.bench step --configs small --recipes bf16,fp8 --override moe_impl=$impl \
        --time-budget-s 180 --json "$out/step_small_fp8_$impl.json"
    done
    ;;
  profile)
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
      run timeout 200 python3 tools/step_gap.py --config moe-1.8b --recipe fp8 --steps 3 --train-steps 0 \
      --trace /tmp/tr_fp8 --top 45 --hlo-dir /tmp/dump --kernels-tsv "$out/kernels_moe18b_fp8_cudnn.tsv"
    ;;
  multi)
    run nvidia-smi -L; run nvidia-smi topo -m
    run python3 -c "import jax; print(jax.__version__, jax.devices())"
    w=/tmp/runs; cc="--compilation-cache /tmp/xla_cache"
    keep() { tar czf "$out/runs.tgz" --exclude=checkpoints -C "$w" . ; }
    train() { name=$1; limit=$2; shift 2; mkdir -p "$w/$name"
      run timeout "$limit" "$@" --config small --workdir "$w/$name" $cc; ls "$w/$name/checkpoints" >>"$log"; keep; }
    train bf16-fsdp2 150 python3 -m lowbit.train --recipe bf16 --steps 200
    train bf16-fsdp2 60 python3 -m lowbit.train --recipe bf16 --steps 240      # resume: continues at 201
    train nvfp4-fsdp2 200 python3 -m lowbit.train --recipe nvfp4 --steps 200
    train bf16-1gpu 90 env CUDA_VISIBLE_DEVICES=0 python3 -m lowbit.train --recipe bf16 --steps 200
    train bf16-expert2 90 python3 -m lowbit.train --recipe bf16 --steps 200 ici_fsdp=1 ici_expert=2
    train bf16-data2 90 python3 -m lowbit.train --recipe bf16 --steps 200 ici_fsdp=1 ici_data=2
    ;;
  multi2)  # why two GPUs gave no more tokens/s than one at batch 32: device step vs the loop, two batch sizes
    for b in 32 128; do
      run timeout 110 env CUDA_VISIBLE_DEVICES=0 python3 tools/step_gap.py --config small --recipe bf16 --steps 20 \
        --train-steps 0 global_batch_size=$b
      run timeout 110 python3 tools/step_gap.py --config small --recipe bf16 --steps 20 --train-steps 0 \
        global_batch_size=$b ici_fsdp=2
    done
    ;;
  multi3)  # where fsdp=2's step goes (54.5 ms vs 58.3 on one GPU at batch 128), and a dense model for contrast
    run timeout 120 python3 tools/step_gap.py --config small --recipe bf16 --steps 10 --train-steps 0 \
      global_batch_size=128 ici_fsdp=2 --trace /tmp/tr_fsdp2 --top 30 --kernels-tsv "$out/kernels_small_fsdp2.tsv"
    dense="--config small --recipe bf16 --steps 10 --train-steps 0 global_batch_size=128 num_experts=0"
    run timeout 90 env CUDA_VISIBLE_DEVICES=0 python3 tools/step_gap.py $dense
    run timeout 90 python3 tools/step_gap.py $dense ici_fsdp=2
    ;;
  multi4)  # after the per-sequence MoE dispatch: one GPU vs fsdp=2 vs data=2, then issue 4's run again
    for b in 128 32; do
      run timeout 80 env CUDA_VISIBLE_DEVICES=0 python3 tools/step_gap.py --config small --steps 10 --train-steps 0 \
        global_batch_size=$b
      for mesh in ici_fsdp=2 "ici_fsdp=1 ici_data=2"; do
        run timeout 80 python3 tools/step_gap.py --config small --steps 10 --train-steps 0 global_batch_size=$b $mesh
      done
    done
    w=/tmp/runs; mkdir -p $w
    run timeout 120 python3 -m lowbit.train --recipe bf16 --config small --steps 200 --workdir $w/bf16-fsdp2
    tar czf "$out/runs.tgz" --exclude=checkpoints -C "$w" .
    ;;
  *) echo "usage: $0 delayed|delayed2|steps|steps4|big|fp8pallas|profile|multi|multi2|multi3|multi4" >&2; exit 2 ;;
esac
