#!/usr/bin/env bash
# Loss and grad-norm curves of the GPU parity test's small model (bf16, lr 3e-3, random mock tokens)
# under five settings: 1 GPU eager / compiled, TP2+SP eager / compiled, TP2 compiled. Shows that at
# this learning rate the curves of correct layouts drift apart at loss spikes.
# Usage (2 GPUs): OUT=/tmp/out bash benchmarks/gpu_curves_small.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/megacore-curves}
mkdir -p "$OUT"
set -uo pipefail
export PYTHONPATH=.
S="model.num_layers=4 model.hidden_size=256 model.num_attention_heads=8 model.num_query_groups=4 model.ffn_hidden_size=704 model.seq_length=256 model.vocab_size=4096 data.source=mock train.global_batch_size=8 train.micro_batch_size=4 train.iters=30 train.warmup_iters=5 train.lr=3e-3 train.eval_interval=0 precision.dtype=bf16 device=cuda log.interval=1 checkpoint.dir=null"
run() { name=$1; shift; timeout 80 python3 -m megacore train configs/tiny_cpu.yaml $S log.dir=$OUT/$name "$@" > $OUT/$name.txt 2>&1; echo "$name rc=$?"; }
run e1 &
run c1 compile=true
wait
run e2 parallel.tensor=2 parallel.sequence_parallel=true --nproc 2
run c2 parallel.tensor=2 parallel.sequence_parallel=true compile=true --nproc 2
run c2nosp parallel.tensor=2 compile=true --nproc 2
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
runs = ["e1", "c1", "e2", "c2", "c2nosp"]
curves = {}
for r in runs:
    try:
        curves[r] = [(x["loss"], x.get("grad_norm", x.get("gnorm"))) for x in map(json.loads, open(f"{out}/{r}/metrics.jsonl")) if "loss" in x]
    except Exception as e:
        curves[r] = []
print("step " + " ".join(f"{r:>16}" for r in runs))
for i in range(30):
    print(f"{i+1:4d} " + " ".join(f"{curves[r][i][0]:8.4f}/{(curves[r][i][1] or 0):7.3f}" if i < len(curves[r]) else " " * 16 for r in runs))
PY
