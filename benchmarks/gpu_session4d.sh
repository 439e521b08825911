#!/usr/bin/env bash
# Fourth session, last device call (2 H100s, ~6 min): the GPU tests of this session's changes (grad
# accumulation kernel and lazy zeroing, the FP8 weight cache in the trainer, the sync-free step, DP2
# with the distributed optimizer), then issue 8 on GPU 0: bf16 baseline vs megacore bf16 vs megacore
# FP8 with and without the weight cache, 8 micro-batches per optimizer step, then one micro-batch.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session4d.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s4d}
mkdir -p "$OUT"
timeout 30 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_grad_accumulate.py > "$OUT/tests_kernel.txt" 2>&1
tail -1 "$OUT/tests_kernel.txt"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/precision/test_fp8.py tests/training/test_deferred_step.py \
  "tests/gpu/test_train_gpu.py::test_bf16_training_on_one_gpu_logs_gpu_metrics" \
  "tests/gpu/test_train_gpu.py::test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16[dp2_distopt]" \
  > "$OUT/tests.txt" 2>&1
grep -E "max relative|^PASSED|^FAILED|^[0-9]+ (passed|failed)|Error" "$OUT/tests.txt" | tail -12
CUDA_VISIBLE_DEVICES=0 timeout 260 python3 benchmarks/bench_train_step.py --accum 8 --steps 3 --warmup 2 --timeout 75 \
  --variants baseline_bf16_compile,megacore_compile,megacore_compile_fp8_nocache,megacore_compile_fp8 \
  --out "$OUT/train_step_accum8.json" > "$OUT/train_step_accum8.txt" 2>&1; tail -6 "$OUT/train_step_accum8.txt"
CUDA_VISIBLE_DEVICES=0 timeout 110 python3 benchmarks/bench_train_step.py --timeout 40 \
  --variants baseline_bf16_compile,megacore_compile,megacore_compile_fp8 \
  --out "$OUT/train_step_accum1.json" > "$OUT/train_step_accum1.txt" 2>&1; tail -5 "$OUT/train_step_accum1.txt"
# Leftover time only: dp1 vs TP2+SP with CUDA graphs, which must now exit on its own.
timeout 120 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 75 \
  --layouts "dp1:1:,tp2sp_cg:2:parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -5 "$OUT/layouts.txt"
