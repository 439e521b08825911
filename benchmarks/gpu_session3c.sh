#!/usr/bin/env bash
# Third GPU session, last call (2 H100s): the compiled TP2+SP GPU test against a compiled one-GPU
# reference, and overlap scheduling with inductor's copy-engine ("low contention") collectives.
# Usage: OUT=/tmp/out bash benchmarks/gpu_session3c.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu3c}
mkdir -p "$OUT"
python3 -c "import torch._inductor.config as c; o=c.aten_distributed_optimizations; print('low contention option:', hasattr(o, 'enable_low_contention_collectives'))"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/gpu/test_train_gpu.py -k "tp2_sp_compiled" \
  > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
SP="parallel.tensor=2 parallel.sequence_parallel=true parallel.tp_comm_overlap=schedule"
MEGACORE_TP_LOW_CONTENTION=1 timeout 200 python3 benchmarks/bench_layouts.py --compile --iters 12 --skip 5 \
  --global-batch 8 --timeout 95 --layouts "sched_lc:2:$SP,sched_c2_lc:2:$SP parallel.tp_batch_chunks=2" \
  --out "$OUT/layouts_lc.json" > "$OUT/layouts_lc.txt" 2>&1; tail -3 "$OUT/layouts_lc.txt"
grep -h -i "error\|low.contention" "$OUT"/layout_runs/*.log | sort | uniq -c | head -8
