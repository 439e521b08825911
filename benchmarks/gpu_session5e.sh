#!/usr/bin/env bash
# Fifth session, fifth device call (2 H100s, ~5 min), issue 4: the copy-engine SP linears without
# the two main-stream kernels call 3's profile showed (the local shard's copy into a gathered
# tensor; the reduce-scatter's separate add, now fused by inductor into the next kernel): op tests,
# one layer timed, dp1 vs TP2+SP with CUDA graphs and copy engines, the 2-GPU parity case.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5e.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5e}
mkdir -p "$OUT"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_sp_overlap_gpu.py > "$OUT/op_tests.txt" 2>&1
grep -E "^PASSED|^FAILED|^E  .*(Error|assert)|^[0-9]+ (passed|failed)" "$OUT/op_tests.txt" | tail -6
timeout 60 torchrun --nproc-per-node 2 benchmarks/bench_sp_overlap.py > "$OUT/bench_sp_overlap.txt" 2>&1
grep -v "^W\|^\*\|Warning\|warn" "$OUT/bench_sp_overlap.txt" | tail -4
CE="parallel.tensor=2 parallel.sequence_parallel=true compile_mode=reduce-overhead parallel.tp_comm_overlap=copy_engine"
timeout 200 python3 benchmarks/bench_layouts.py --compile --iters 24 --skip 8 --global-batch 8 --timeout 100 \
  --layouts "dp1:1:,tp2sp_cg_ce:2:$CE" --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -4 "$OUT/layouts.txt"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  "tests/gpu/test_train_gpu.py::test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16[tp2_sp_copy_engine]" \
  > "$OUT/parity.txt" 2>&1
grep -E "max relative|^PASSED|^FAILED|^[0-9]+ (passed|failed)" "$OUT/parity.txt" | tail -4
