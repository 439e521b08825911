#!/usr/bin/env bash
# What the next GPU session should run first (2 H100s, one device call, ~9 min): the GPU tests of the
# changes made after the last GPU run (token-sharded SP, the fused vocab-parallel loss head in eager
# TP, context parallelism, compiled TP parity), then TP2+SP with and without tp_comm_overlap and CP2
# against one GPU. Usage: OUT=/tmp/out bash benchmarks/gpu_next.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-next}
mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/gpu tests/parallel tests/precision \
  tests/training/test_deferred_step.py 2>&1 | tail -6
timeout 330 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 150 \
  --layouts "dp1:1:,tp2sp:2:parallel.tensor=2 parallel.sequence_parallel=true,\
tp2sp_ovl:2:parallel.tensor=2 parallel.sequence_parallel=true parallel.tp_comm_overlap=true,\
cp2:2:parallel.context=2 parallel.distributed_optimizer=true" --out "$OUT/layouts.json" 2>&1 | tail -6
