#!/usr/bin/env bash
# Fifth session, first device call (2 H100s, ~8 min), issue 4 (TP2+SP at 75% of one GPU, target 85%):
#  1. collective speed: NCCL default vs NCCL_MIN_NCHANNELS=32, and copy-engine (symmetric-memory)
#     all-gather / reduce-scatter, eager and captured in a CUDA graph;
#  2. where the CUDA-graph TP2+SP step's time goes (CUDA-only profile: compute, comm, idle);
#  3. layouts: dp1 vs TP2+SP with CUDA graphs, + 32 NCCL channels, + torch's async TP (symm_mem);
#  4. the 2-GPU parity test with CUDA graphs (not yet run on a GPU).
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5a.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5a}
mkdir -p "$OUT"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1; head -4 "$OUT/topo.txt"
timeout 90 torchrun --nproc-per-node 2 benchmarks/bench_nccl.py --sizes 16,32 --dtypes bf16 --copy-engine --graph \
  > "$OUT/nccl_default.txt" 2>&1; grep -v "^W\|^\*" "$OUT/nccl_default.txt" | tail -8
NCCL_MIN_NCHANNELS=32 timeout 60 torchrun --nproc-per-node 2 benchmarks/bench_nccl.py --sizes 16,32 --dtypes bf16 --graph \
  > "$OUT/nccl_ch32.txt" 2>&1; grep -v "^W\|^\*" "$OUT/nccl_ch32.txt" | tail -4
TP="parallel.tensor=2 parallel.sequence_parallel=true"
timeout 120 torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/llama_1b_gpu.yaml $TP compile_mode=reduce-overhead \
  train.global_batch_size=8 --cuda-only --warmup 5 --steps 3 --out "$OUT/prof" > "$OUT/profile_cg.txt" 2>&1
grep -A12 "^per step" "$OUT/profile_cg.txt"; grep "^step" "$OUT/profile_cg.txt"
timeout 270 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 80 \
  --layouts "dp1:1:,tp2sp_cg:2:$TP compile_mode=reduce-overhead,tp2sp_cg_ch32:2:$TP compile_mode=reduce-overhead ENV.NCCL_MIN_NCHANNELS=32,tp2sp_cg_asynctp:2:$TP compile_mode=reduce-overhead parallel.tp_comm_overlap=symm_mem" \
  --out "$OUT/layouts.json" > "$OUT/layouts.txt" 2>&1; tail -7 "$OUT/layouts.txt"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
  "tests/gpu/test_train_gpu.py::test_two_gpu_layouts_reproduce_one_gpu_curve_in_bf16[tp2_sp_cudagraphs]" \
  > "$OUT/tests.txt" 2>&1
grep -E "max relative|^PASSED|^FAILED|^[0-9]+ (passed|failed)" "$OUT/tests.txt" | tail -4
