#!/usr/bin/env bash
# Single-GPU session (one H100, one device call, ~7 minutes, at most ~9.5 with every stage timing out): GPU tests, training-step throughput of
# DESIGN.md's 1B config (baseline vs megacore), recompute memory, kernel micro-benchmarks; a summary
# at the end. Every stage has its own timeout and writes its log/JSON to $OUT as it goes, so a stage
# that runs long loses only itself.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh                 # tests train recompute kernels
#   OUT=/tmp/out bash benchmarks/gpu_session.sh train_extra     # the other train-step variants (~5 min)
#   SMOKE=1 OUT=/tmp/out bash benchmarks/gpu_session.sh train recompute   # tiny shapes on CPU: checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/megacore-gpu-session}
mkdir -p "$OUT"
STAGES=${*:-"tests train recompute kernels"}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >> "$OUT/env.txt" 2>/dev/null
SMALL="--steps 6 --warmup 3"
MODEL=""                      # DESIGN.md's 1B config (the scripts' defaults)
SHAPES="2048x4,8192x1"
if [ "${SMOKE:-0}" = 1 ]; then
  MODEL="--device cpu --layers 2 --hidden 128 --heads 4 --kv-heads 4 --ffn 256 --vocab 1000 --seq 64 --mbs 2"
  SMALL="--steps 1 --warmup 1"; SHAPES="64x2,128x1"
fi

for stage in $STAGES; do
stamp "stage $stage"
case $stage in
tests)  # GPU-marked tests of the model and kernels, and the kernels-in-model tests on CUDA
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/kernels -k "not two_gpu" \
    > "$OUT/tests_gpu.txt" 2>&1; echo "pytest -m gpu rc $?" | tee -a "$OUT/tests_gpu.txt"
  timeout 40 python3 -m pytest -q -p no:cacheprovider tests/models/test_kernels_in_model.py \
    > "$OUT/tests_model_kernels.txt" 2>&1; echo "pytest kernels-in-model rc $?" | tee -a "$OUT/tests_model_kernels.txt"
  tail -3 "$OUT/tests_gpu.txt" "$OUT/tests_model_kernels.txt"
  ;;
train)  # 1B, seq 2048, micro batch 4: baseline vs megacore, Triton kernels vs torch references
  timeout 270 python3 benchmarks/bench_train_step.py $MODEL $SMALL --timeout 150 \
    --variants baseline_bf16_eager,baseline_bf16_compile,megacore_eager,megacore_compile,megacore_compile_torchkernels \
    --out "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1
  echo "train rc $?"; tail -8 "$OUT/train_step.txt"
  ;;
train_extra)  # the rest: AMP baseline, selective / full recompute, eager without kernels
  timeout 480 python3 benchmarks/bench_train_step.py $MODEL $SMALL --timeout 150 \
    --variants baseline_amp_compile,megacore_compile_sel_attn,megacore_compile_sel_attn_mlp,megacore_compile_full,megacore_eager_torchkernels \
    --out "$OUT/train_step_extra.json" > "$OUT/train_step_extra.txt" 2>&1
  echo "train_extra rc $?"; tail -8 "$OUT/train_step_extra.txt"
  ;;
recompute)  # peak memory per recompute mode at seq 2048 x mbs 4 and seq 8192 x mbs 1 (eager)
  timeout 100 python3 benchmarks/bench_recompute_memory.py $MODEL --shapes $SHAPES --steps 2 --warmup 1 --timeout 40 \
    --out "$OUT/recompute.json" > "$OUT/recompute.txt" 2>&1
  echo "recompute rc $?"; tail -10 "$OUT/recompute.txt"
  ;;
kernels)  # Triton kernels vs torch eager vs torch.compile references at the 1B shapes
  timeout 80 python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
  echo "kernels rc $?"; tail -12 "$OUT/kernels.txt"
  ;;
*) echo "unknown stage $stage (tests train train_extra recompute kernels)" ;;
esac
done

stamp "summary"
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def num(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
print(open(os.path.join(out, "env.txt")).read().strip())
for name in ("tests_gpu.txt", "tests_model_kernels.txt"):
    p = os.path.join(out, name)
    if os.path.exists(p):
        lines = [l for l in open(p).read().splitlines() if l.strip()]
        print(f"{name}: {' | '.join(lines[-2:])}")
for name in ("train_step.json", "train_step_extra.json"):
    d = load(name)
    if not d:
        continue
    c = d["config"]
    print(f"\n{name}: L={c['layers']} h={c['hidden']} ffn={c['ffn']} V={c['vocab']}, seq {c['seq']} x mbs {c['mbs']}, "
          f"{c['steps']} steps after {c['warmup']}; MFU over 989 TFLOP/s")
    print(f"{'variant':<32}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}")
    for r in d["results"]:
        if "error" in r:
            print(f"{r['variant']:<32}{r['error'][:30]:>10}")
        else:
            print(f"{r['variant']:<32}{r['tokens_per_s']:>10,.0f}{r['model_tflops']:>9.1f}{100*r['mfu']:>6.1f}%"
                  f"{num(r['peak_mem_gb'], '.1f'):>9}")
d = load("recompute.json")
if d:
    print(f"\nrecompute (eager):\n{'mode':<14}{'seq x mbs':>10}{'tokens/s':>10}{'peak GB':>9}{'static GB':>10}")
    for r in d["results"]:
        shape = f"{r['seq']}x{r['mbs']}"
        if "error" in r:
            print(f"{r['mode']:<14}{shape:>10}{r['error']:>10}")
        else:
            print(f"{r['mode']:<14}{shape:>10}{r['tokens_per_s']:>10,.0f}{num(r['peak_mem_gb'], '.1f'):>9}"
                  f"{num(r['static_mem_gb'], '.1f'):>10}")
d = load("kernels.json")
if d:
    print("\nkernels (fwd+bwd ms):")
    for r in d["rows"]:
        extra = f"  {r['tflops']:.0f} TFLOP/s  peak {r['peak_gib']:.2f} GiB" if "tflops" in r else \
            f"  {r.get('fwd_bwd_gbs', 0):.0f} GB/s"
        print(f"  {r['kernel']:<34}{r['impl']:<18}{num(r.get('fwd_bwd_ms'), '8.3f'):>8}{extra}")
EOF
stamp "done"
