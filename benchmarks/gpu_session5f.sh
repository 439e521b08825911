#!/usr/bin/env bash
# Fifth session, last device call (one H100, < 3 min): first GPU runs of the LLaVA model (against
# HF on the same GPU, and a bf16 training step) and of a hybrid Mamba-2 stack (30 compiled bf16
# steps of `megacore train`).
# Usage: OUT=/tmp/out bash benchmarks/gpu_session5f.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-s5f}
mkdir -p "$OUT"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_llava_gpu.py > "$OUT/llava.txt" 2>&1
grep -E "^PASSED|^FAILED|^E  .*(Error|assert)|^[0-9]+ (passed|failed)" "$OUT/llava.txt" | tail -4
timeout 90 python3 -m megacore train configs/tiny_cpu.yaml model.layer_pattern=M*M- model.mamba_num_groups=2 \
  device=cuda precision.dtype=bf16 compile=true data.source=mock train.iters=30 log.interval=10 \
  log.dir="$OUT/hybrid" checkpoint.dir=null > "$OUT/hybrid.log" 2>&1; echo "hybrid run: rc $?"
tail -3 "$OUT/hybrid.log"
