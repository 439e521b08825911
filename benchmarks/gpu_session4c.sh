#!/usr/bin/env bash
# Fourth session, third device call (2 H100s): (1) TP2+SP with CUDA graphs exits cleanly now that
# the trainer frees the captured graphs before destroying the process groups; (2) one GPU, issue 8:
# bf16 baseline vs megacore bf16 vs megacore FP8, one micro-batch per step with a kernel profile by
# category, then 8 micro-batches per optimizer step (gradient accumulation) for all three.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session4c.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s4c}
mkdir -p "$OUT"
start=$(date +%s)
timeout 130 python3 -m megacore train configs/llama_1b_gpu.yaml train.iters=6 train.global_batch_size=8 \
  log.dir=$OUT/cg_exit checkpoint.dir=null checkpoint.interval=0 compile=true compile_mode=reduce-overhead \
  parallel.tensor=2 parallel.sequence_parallel=true --nproc 2 > "$OUT/cg_exit.log" 2>&1
echo "tp2sp CUDA graphs run: rc $? after $(( $(date +%s) - start )) s"; grep -E "done:" "$OUT/cg_exit.log" | tail -1
V=baseline_bf16_compile,megacore_compile,megacore_compile_fp8
CUDA_VISIBLE_DEVICES=0 timeout 230 python3 benchmarks/bench_train_step.py --variants $V --timeout 75 \
  --profile "$OUT/prof" --out "$OUT/train_step_accum1.json" > "$OUT/train_step_accum1.txt" 2>&1
grep -A60 "GPU ms per step by category" "$OUT/train_step_accum1.txt" | grep -v "^{" | head -100; tail -5 "$OUT/train_step_accum1.txt"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_train_step.py --variants $V --timeout 65 --accum 8 \
  --steps 3 --warmup 2 --out "$OUT/train_step_accum8.json" > "$OUT/train_step_accum8.txt" 2>&1
tail -5 "$OUT/train_step_accum8.txt"
