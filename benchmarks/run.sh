#!/usr/bin/env bash
# Runs benchmark programs of this folder one after another and keeps what they print (benchmarks/README.md).
#
#   benchmarks/run.sh NAME [ARGS...] [+ NAME [ARGS...]]...
#
# NAME is a program's file name without "bench_" and ".py" (train_step, kernels, layouts, ...); ARGS go
# to that program. Output goes to DIR/YYYY-MM-DD-CARD-NAME.log (and .json for the programs that write
# JSON, unless ARGS name the file), where DIR is $OUT if set, else benchmarks/results. Environment:
# CARD (default: GPU model and count, e.g. h100x2), NPROC (ranks of the torchrun programs, default 2),
# TIMEOUT (seconds per program, default none).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
DIR=${OUT:-benchmarks/results}
if [ $# -eq 0 ]; then sed -n '2,10p' "$0"; exit 2; fi
mkdir -p "$DIR"
{ read -r DETECTED; read -r VERSIONS; } < <(python3 - <<'EOF'
import re, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
name = torch.cuda.get_device_name() if n else "cpu"
m = re.search(r"[A-Za-z]\d{2,4}", name) if n else None
print((m.group().lower() if m else "gpu" if n else "cpu") + (f"x{n}" if n > 1 else ""))
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
print(f"torch {torch.__version__}, triton {tv}, " + (f"{n} x {name}" if n else "cpu"))
EOF
)
CARD=${CARD:-$DETECTED}

run_one() {
  local name=$1; shift
  local prog=benchmarks/bench_$name.py
  [ -f "$prog" ] || prog=benchmarks/$name.py
  if [ ! -f "$prog" ]; then echo "run.sh: no benchmark named $name" >&2; return 2; fi
  local stem="$DIR/$(date +%F)-$CARD-$name" n=2
  local base=$stem
  while [ -e "$stem.log" ]; do stem=$base-$n; n=$((n + 1)); done
  local flag=""
  case $name in
    train_step|recompute_memory|layouts) flag=--out ;;
    kernels|checkpoint_stall) flag=--json ;;
  esac
  if [ -n "$flag" ] && [[ " $* " != *" $flag "* && " $* " != *" $flag="* ]]; then set -- "$@" "$flag" "$stem.json"; fi
  local launch=(python3)
  case $name in nccl|sp_overlap|nccl_groups|profile_step) launch=(torchrun --nproc-per-node "$NPROC") ;; esac
  if [ -n "${TIMEOUT:-}" ]; then launch=(timeout "$TIMEOUT" "${launch[@]}"); fi
  printf '# %s\n# %s\n' "$VERSIONS" "$(printf '%q ' "${launch[@]}" "$prog" "$@")" > "$stem.log"
  "${launch[@]}" "$prog" "$@" 2>&1 | tee -a "$stem.log"
  local rc=${PIPESTATUS[0]}
  echo "# rc $rc" >> "$stem.log"
  echo "run.sh: $name rc $rc, log $stem.log" >&2
  return "$rc"
}

NPROC=${NPROC:-2}
status=0
args=()
for a in "$@" +; do
  if [ "$a" != + ]; then args+=("$a"); continue; fi
  if [ ${#args[@]} -gt 0 ]; then run_one "${args[@]}" || status=1; fi
  args=()
done
exit $status
