#!/usr/bin/env bash
# Multi-GPU session (4 H100s, one device call): layout parity + per-GPU throughput of the 1B config,
# a checkpoint saved at TP2xPP2 resumed at TP4 and at PP2xDP2 on GPUs, and the 8B model on 4 GPUs.
# Logs and JSON go to $OUT. Usage: OUT=/tmp/out bash benchmarks/gpu_multi.sh [stage ...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-multi}
mkdir -p "$OUT"
STAGES=${*:-"layouts ckpt 8b"}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU; stages: $STAGES" | tee "$OUT/summary.txt"

for stage in $STAGES; do
case $stage in
layouts2)  # two GPUs: DP2 / TP2(+SP) / PP2 against one GPU
  timeout 420 python3 benchmarks/bench_layouts.py --iters 25 --skip 8 --global-batch 8 \
    --out "$OUT/layouts2.json" 2>&1 | tee "$OUT/layouts2.txt" | tail -12
  ;;
layouts)  # four GPUs: 1B at DP4, TP2xPP2, TP2(SP)xDP2 against one GPU, global batch 16
  timeout 480 python3 benchmarks/bench_layouts.py --iters 25 --skip 8 --global-batch 16 --layouts \
"dp1:1:,dp2:2:,tp2_sp:2:parallel.tensor=2 parallel.sequence_parallel=true,pp2:2:parallel.pipeline=2 train.micro_batch_size=1,\
dp4_distopt:4:parallel.distributed_optimizer=true,tp2pp2_sp:4:parallel.tensor=2 parallel.pipeline=2 parallel.sequence_parallel=true train.micro_batch_size=1,\
tp2dp2_sp_distopt:4:parallel.tensor=2 parallel.sequence_parallel=true parallel.distributed_optimizer=true" \
    --out "$OUT/layouts4.json" 2>&1 | tee "$OUT/layouts4.txt" | tail -14
  ;;
ckpt)  # save at TP2xPP2 (step 6), resume at TP4 and at PP2xDP2; the loss continues the uninterrupted run
  C="$OUT/ckpt"; rm -rf "$C"; mkdir -p "$C"
  COMMON="train.iters=10 train.global_batch_size=8 train.warmup_iters=3 log.interval=1 compile=false"
  timeout 200 python3 -m megacore train configs/llama_1b_gpu.yaml $COMMON log.dir=$C/full parallel.tensor=2 \
    parallel.pipeline=2 parallel.sequence_parallel=true train.micro_batch_size=1 checkpoint.dir=$C/ckpt \
    checkpoint.interval=6 checkpoint.async_save=true --nproc 4 > "$C/full.log" 2>&1; echo "full rc $?"
  timeout 150 python3 -m megacore train configs/llama_1b_gpu.yaml $COMMON log.dir=$C/tp4 parallel.tensor=4 \
    checkpoint.dir=null checkpoint.interval=0 checkpoint.load=$C/ckpt/iter_0000006 --nproc 4 > "$C/tp4.log" 2>&1; echo "tp4 rc $?"
  timeout 150 python3 -m megacore train configs/llama_1b_gpu.yaml $COMMON log.dir=$C/pp2dp2 parallel.pipeline=2 \
    parallel.distributed_optimizer=true train.micro_batch_size=1 checkpoint.dir=null checkpoint.interval=0 \
    checkpoint.load=$C/ckpt/iter_0000006 --nproc 4 > "$C/pp2dp2.log" 2>&1; echo "pp2dp2 rc $?"
  grep -h "stalled\|resumed" "$C"/*.log | head -5
  python3 - "$C" <<'EOF' | tee "$OUT/ckpt.txt"
import json, os, sys
c = sys.argv[1]
def losses(d):
    p = os.path.join(c, d, "metrics.jsonl")
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r} if os.path.exists(p) else {}
full = losses("full")
for d in ("tp4", "pp2dp2"):
    got = losses(d)
    diffs = [abs(got[s] - full[s]) / full[s] for s in got if s in full]
    print(f"resume {d}: steps {sorted(got)} max rel diff vs uninterrupted {max(diffs) if diffs else 'n/a'}")
print("uninterrupted:", {s: round(v, 4) for s, v in full.items()})
EOF
  ;;
8b)  # Llama-3-8B shape on 4 GPUs, TP2xPP2 (SP, distributed optimizer, selective recompute), seq 8192
  timeout 420 python3 benchmarks/bench_layouts.py --config configs/llama_8b_8gpu.yaml --iters 6 --skip 3 \
    --global-batch 16 --warmup 2 --layouts "tp2pp2_8b:4:parallel.tensor=2 parallel.pipeline=2" \
    --out "$OUT/llama8b.json" 2>&1 | tee "$OUT/llama8b.txt" | tail -5
  ;;
esac
done
