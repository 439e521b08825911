#!/usr/bin/env bash
# Third GPU session of 2026-11-27, first experiment call (2 H100s): the two GPU tests that failed or did
# not finish in the previous call, TP2+SP with inductor's comm/compute overlap scheduling with and
# without sequence groups (parallel.tp_batch_chunks), and a CUDA-only profile that shows where the
# TP step idles. Usage: OUT=/tmp/out bash benchmarks/gpu_session3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu3}
mkdir -p "$OUT"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/gpu/test_train_gpu.py \
  -k "tp2_sp_compiled or cp2" > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
SP="parallel.tensor=2 parallel.sequence_parallel=true"
timeout 300 python3 benchmarks/bench_layouts.py --compile --iters 12 --skip 5 --global-batch 8 --timeout 100 \
  --layouts "tp2sp:2:$SP,tp2sp_sched:2:$SP parallel.tp_comm_overlap=schedule,\
tp2sp_sched_c2:2:$SP parallel.tp_comm_overlap=schedule parallel.tp_batch_chunks=2,\
tp2sp_reord_c2:2:$SP parallel.tp_comm_overlap=reorder parallel.tp_batch_chunks=2" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -6 "$OUT/layouts.txt"
grep -h "tp_comm_overlap=" "$OUT"/layout_runs/*.log 2>/dev/null | sort | uniq | head -4
timeout 100 torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/llama_1b_gpu.yaml $SP \
  parallel.tp_comm_overlap=schedule parallel.tp_batch_chunks=2 compile=true train.global_batch_size=8 \
  --cuda-only --warmup 4 --steps 3 --out /tmp/prof --rows 12 > "$OUT/prof_sched_c2.txt" 2>&1
grep -A12 "^per step" "$OUT/prof_sched_c2.txt"
