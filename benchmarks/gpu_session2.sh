#!/usr/bin/env bash
# Second GPU session of 2026-11-27 (2 H100s, one device call): the throughput targets of issues 4, 5
# and 8 after the compile/TP, sync-free step and FP8 work. Usage: OUT=/tmp/out bash benchmarks/gpu_session2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu2}
mkdir -p "$OUT"
# Layouts, compiled. dp1 (2 micro-batches of 4) is the reference of the TP rows (same global batch);
# dp1_mb1 (1 micro-batch of 4) is the weak-scaling reference of the DP rows (same work per GPU).
timeout 330 python3 benchmarks/bench_layouts.py --compile --iters 14 --skip 5 --global-batch 8 --timeout 150 \
  --layouts "dp1:1:,tp2sp:2:parallel.tensor=2 parallel.sequence_parallel=true,dp1_mb1:1:train.global_batch_size=4,\
dp2:2:,dp2_distopt:2:parallel.distributed_optimizer=true,tp2sp_ovl:2:parallel.tensor=2 parallel.sequence_parallel=true parallel.tp_comm_overlap=true" \
  --out "$OUT/layouts.json" 2>&1 | tail -9
# One GPU: plain bf16 baseline vs megacore (fp32 masters) vs megacore with FP8 GEMMs, compiled.
timeout 170 python3 benchmarks/bench_train_step.py --variants baseline_bf16_compile,megacore_compile,megacore_compile_fp8 \
  --steps 6 --warmup 3 --out "$OUT/step.json" 2>&1 | tail -4
timeout 90 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/precision tests/training/test_deferred_step.py \
  tests/distributed/test_dp_gpu.py tests/gpu/test_train_gpu.py 2>&1 | tail -4
