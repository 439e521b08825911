#!/usr/bin/env bash
# Fifth session, second device call (2 H100s, ~6 min), issue 4: the copy-engine SP linears
# (parallel.tp_comm_overlap=copy_engine): op tests against the NCCL reference (eager and CUDA graph),
# one layer's SP linears timed, then dp1 vs TP2+SP with CUDA graphs, without and with them, and the
# 2-GPU training parity case.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5b}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_sp_overlap_gpu.py > "$OUT/op_tests.txt" 2>&1
grep -E "^PASSED|^FAILED|^E  .*(Error|assert)|^[0-9]+ (passed|failed)" "$OUT/op_tests.txt" | tail -8
timeout 90 torchrun --nproc-per-node 2 benchmarks/bench_sp_overlap.py > "$OUT/bench_sp_overlap.txt" 2>&1
grep -v "^W\|^\*\|Warning\|warn" "$OUT/bench_sp_overlap.txt" | tail -6
TP="parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead"
timeout 240 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 90 \
  --layouts "dp1:1:,tp2sp_cg:2:$TP,tp2sp_cg_ce:2:$TP parallel.tp_comm_overlap=copy_engine" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -6 "$OUT/layouts.txt"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  "tests/gpu/test_train_gpu.py::test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16[tp2_sp_copy_engine]" \
  > "$OUT/parity.txt" 2>&1
grep -E "max relative|^PASSED|^FAILED|^[0-9]+ (passed|failed)" "$OUT/parity.txt" | tail -4
