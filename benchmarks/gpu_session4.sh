#!/usr/bin/env bash
# Fourth session, first device call (2 H100s, < 600 s): SDPA backends at the 1B shapes (issue 8),
# the GPU tests not run since their last change (2-GPU parity at lr 1e-3 incl. MoE EP2, FP8,
# sync-free step), then dp1 vs TP2+SP vs TP2+SP with CUDA graphs, with each step's host share (issue 4).
# Usage: OUT=/tmp/out bash benchmarks/gpu_session4.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s4}
mkdir -p "$OUT"
timeout 60 python3 benchmarks/bench_attention.py > "$OUT/attention.txt" 2>&1; cat "$OUT/attention.txt"
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_train_gpu.py tests/precision \
  tests/training/test_deferred_step.py -k "not tp2_sp" > "$OUT/tests.txt" 2>&1
grep -E "max relative|passed|failed|PASSED|FAILED|Error" "$OUT/tests.txt" | tail -14
timeout 280 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 95 \
  --layouts "dp1:1:,tp2sp:2:parallel.tensor=2 parallel.sequence_parallel=true,\
tp2sp_cudagraphs:2:parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -6 "$OUT/layouts.txt"
