#!/usr/bin/env bash
# What the next GPU session should run first (2 H100s, one device call, ~8 min): the GPU tests not run
# since their last change (the 2-GPU parity cases at lr 1e-3, including MoE with expert parallelism
# over NCCL, FP8, the sync-free step), then dp1 vs
# TP2+SP with the host share of each step (bench_layouts' "host" column: near 100% means the host,
# not the GPU, sets the pace; that decides where TP2+SP's ~25 ms of idle per step comes from).
# If the host sets the pace, compile_mode=reduce-overhead (CUDA graphs) is the candidate fix (third row).
# Usage: OUT=/tmp/out bash benchmarks/gpu_next.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-next}
mkdir -p "$OUT"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_train_gpu.py tests/precision \
  tests/training/test_deferred_step.py -k "not tp2_sp" > "$OUT/tests.txt" 2>&1
grep -E "max relative|passed|failed" "$OUT/tests.txt" | tail -8
timeout 280 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 95 \
  --layouts "dp1:1:,tp2sp:2:parallel.tensor=2 parallel.sequence_parallel=true,\
tp2sp_cudagraphs:2:parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead" \
  --out "$OUT/layouts.json" 2>&1 | tail -4
