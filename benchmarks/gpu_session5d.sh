#!/usr/bin/env bash
# Fifth session, fourth device call (2 H100s, ~4 min), issue 4: a second measurement of TP2+SP with
# CUDA graphs and the copy-engine SP linears against dp1 in one call, twice, with more timed steps
# (call 3 measured 85.8% on 9 timed steps).
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5d.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5d}
mkdir -p "$OUT"
CE="parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead parallel.tp_comm_overlap=copy_engine"
timeout 300 python3 benchmarks/bench_layouts.py --compile --iters 24 --skip 8 --global-batch 8 --timeout 100 \
  --layouts "dp1:1:,tp2sp_cg_ce:2:$CE,tp2sp_cg_ce_again:2:$CE" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -5 "$OUT/layouts.txt"
