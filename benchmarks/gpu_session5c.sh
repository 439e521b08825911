#!/usr/bin/env bash
# Fifth session, third device call (2 H100s, ~6 min), issue 4: the copy-engine SP linears with the
# symmetric workspace exchanged at start-up (call 2's graph warm-up refused two untracked rendezvous
# arrays): dp1 vs TP2+SP with CUDA graphs without / with them (and compiled without graphs), the
# 2-GPU parity case, then a CUDA-only profile of the copy-engine step.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5c.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5c}
mkdir -p "$OUT"
TP="parallel.tensor=2 parallel.sequence_parallel=true"
timeout 280 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 90 \
  --layouts "dp1:1:,tp2sp_cg:2:$TP compile_mode=reduce-overhead,tp2sp_cg_ce:2:$TP compile_mode=reduce-overhead parallel.tp_comm_overlap=copy_engine,tp2sp_ce:2:$TP parallel.tp_comm_overlap=copy_engine" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -7 "$OUT/layouts.txt"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  "tests/gpu/test_train_gpu.py::test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16[tp2_sp_copy_engine]" \
  > "$OUT/parity.txt" 2>&1
grep -E "max relative|^PASSED|^FAILED|^[0-9]+ (passed|failed)" "$OUT/parity.txt" | tail -4
timeout 120 torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/llama_1b_gpu.yaml $TP compile_mode=reduce-overhead \
  parallel.tp_comm_overlap=copy_engine train.global_batch_size=8 --cuda-only --warmup 5 --steps 3 --out "$OUT/prof" \
  > "$OUT/profile_cg_ce.txt" 2>&1
grep -A12 "^per step" "$OUT/profile_cg_ce.txt"; grep "^step" "$OUT/profile_cg_ce.txt"
