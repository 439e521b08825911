#!/usr/bin/env bash
# Fourth session, second device call (2 H100s): TP2+SP with CUDA graphs (compile_mode=reduce-overhead),
# alone and with inductor's overlap scheduler, and with NCCL kept to few CTAs so overlapped collectives
# take fewer SMs from the GEMMs (issue 4). A run whose steps all finished but that does not exit
# dumps every thread's stack after 75 s (MEGACORE_HANG_DUMP_S) into its log.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session4b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s4b}
mkdir -p "$OUT"
export MEGACORE_HANG_DUMP_S=75
CG="parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead"
timeout 560 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 100 \
  --layouts "dp1:1:,tp2sp_cg:2:$CG,tp2sp_cg_sched:2:$CG parallel.tp_comm_overlap=schedule,\
tp2sp_cg_sched_ctas8:2:$CG parallel.tp_comm_overlap=schedule ENV.NCCL_MAX_CTAS=8" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -7 "$OUT/layouts.txt"
grep -h -A30 "Timeout (0:01:15)" "$OUT"/layout_runs/tp2sp_cg.log | head -60
