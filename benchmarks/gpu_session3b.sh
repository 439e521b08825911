#!/usr/bin/env bash
# Third GPU session, second experiment call (2 H100s): where the plain TP2+SP step idles (CUDA-only
# profile), and whether overlap with sequence groups pays once cuBLAS leaves SMs to NCCL
# (MEGACORE_TP_SM_MARGIN). Usage: OUT=/tmp/out bash benchmarks/gpu_session3b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu3b}
mkdir -p "$OUT"
SP="parallel.tensor=2 parallel.sequence_parallel=true"
timeout 100 torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/llama_1b_gpu.yaml $SP compile=true \
  train.global_batch_size=8 --cuda-only --warmup 4 --steps 3 --out /tmp/prof --rows 12 > "$OUT/prof_tp2sp.txt" 2>&1
grep -A12 "^per step" "$OUT/prof_tp2sp.txt"
for m in 16 32; do
  MEGACORE_TP_SM_MARGIN=$m timeout 95 python3 benchmarks/bench_layouts.py --compile --iters 12 --skip 5 \
    --global-batch 8 --timeout 90 --layouts "sched_c2_sm$m:2:$SP parallel.tp_comm_overlap=schedule parallel.tp_batch_chunks=2" \
    --out "$OUT/layouts_sm$m.json" > "$OUT/layouts_sm$m.txt" 2>&1; tail -1 "$OUT/layouts_sm$m.txt"
done
