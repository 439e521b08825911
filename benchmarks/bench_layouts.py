"""Parallel layouts of one model, side by side in one run: loss parity and per-GPU throughput.

Each layout is a real ``megacore train`` run (``--nproc N``: torchrun, NCCL on GPUs, gloo on CPU)
of the same config, seed and data; the first layout is the reference. For every run the table gives
the median tokens/s per GPU over the steps after ``--skip`` warm-up steps, its ratio to the
reference's per-GPU throughput, the peak memory, the largest relative loss difference to the
reference over all steps, and the host share (median host time to queue a step over the step's
wall time; near 100% the host, not the GPU, sets the pace).

    python benchmarks/bench_layouts.py --out $OUT/layouts.json                 # 1B config, 2 GPUs
    python benchmarks/bench_layouts.py --config configs/tiny_cpu.yaml --device cpu --iters 4 \
        --layouts 'dp1:1:,tp2sp:2:parallel.tensor=2 parallel.sequence_parallel=true'   # CPU smoke

``--layouts`` is a comma-separated list of ``name:nproc:overrides`` (overrides space-separated; an
override ``ENV.NAME=value`` sets an environment variable of that run instead, e.g. an NCCL knob).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_LAYOUTS = ",".join([
    "dp1:1:",
    "dp2:2:",
    "dp2_distopt:2:parallel.distributed_optimizer=true",
    "tp2_sp:2:parallel.tensor=2 parallel.sequence_parallel=true",
    "tp2:2:parallel.tensor=2",
    "pp2:2:parallel.pipeline=2 train.micro_batch_size=1",
])


def parse_layouts(text: str) -> list[tuple[str, int, list[str]]]:
    out = []
    for item in text.split(","):
        name, nproc, overrides = item.split(":", 2)
        out.append((name, int(nproc), overrides.split()))
    return out


def run_layout(args, name: str, nproc: int, overrides: list[str], work: str) -> dict:
    log_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "megacore", "train", args.config, f"train.iters={args.iters}",
           f"train.global_batch_size={args.global_batch}", f"train.warmup_iters={args.warmup}", "log.interval=1",
           f"log.dir={log_dir}", "checkpoint.dir=null", "checkpoint.interval=0", f"device={args.device}",
           f"compile={str(args.compile).lower()}", *args.common.split(), *overrides]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(dict(o[len("ENV."):].split("=", 1) for o in overrides if o.startswith("ENV.")))
    cmd = [c for c in cmd if not c.startswith("ENV.")]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # keep what it logged: the steps may all be done (a hang at exit)
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        rc, stdout, stderr = "timeout", text(e.stdout), text(e.stderr)
    wall = time.time() - start
    with open(os.path.join(work, f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + stdout + "\n" + stderr)
    result = {"name": name, "nproc": nproc, "overrides": overrides, "rc": rc, "wall_s": wall}
    path = os.path.join(log_dir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip() and "loss" in line]
        records = [r for r in records if "loss" in r]
    if rc == "timeout" and len(records) == args.iters:
        result["note"] = f"all {args.iters} steps logged, then no exit within {args.timeout} s"
    elif rc != 0 or not records:
        tail = [ln for ln in stderr.splitlines() if "Error" in ln or "error" in ln][-5:]
        result["error"] = " | ".join(tail) or stderr[-500:]
        return result
    timed = records[args.skip:] or records
    result["losses"] = [r["loss"] for r in records]
    result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
    result["tokens_per_s_per_gpu"] = result["tokens_per_s"] / nproc
    result["mem_gb"] = max((r.get("mem_gb") or 0.0) for r in records)
    result["tflops_per_gpu"] = statistics.median((r.get("tflops_per_gpu") or 0.0) for r in timed)
    # Host share: the time to queue a step over the step's wall time (near 100%: host-bound).
    result["host_share"] = statistics.median(r.get("host_queue_s", 0.0) / r["step_time_s"] for r in timed)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_1b_gpu.yaml")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the timing")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5, help="LR warm-up steps (so the loss moves)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--common", default="", help="extra overrides for every layout, space-separated")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="megacore-layouts-") if not args.out else os.path.join(
        os.path.dirname(os.path.abspath(args.out)), "layout_runs")
    os.makedirs(work, exist_ok=True)
    results = []
    for name, nproc, overrides in parse_layouts(args.layouts):
        r = run_layout(args, name, nproc, overrides, work)
        results.append(r)
        print(f"{name}: rc {r['rc']}, {r.get('tokens_per_s_per_gpu', 0):,.0f} tok/s/GPU, wall {r['wall_s']:.0f}s"
              + (f"  ERROR {r['error']}" if "error" in r else "") + (f"  ({r['note']})" if "note" in r else ""),
              flush=True)

    ref = results[0]
    print(f"\n{'layout':<14} {'GPUs':>4} {'tok/s/GPU':>11} {'vs ref':>7} {'TFLOP/s/GPU':>11} {'mem GB':>7} "
          f"{'max rel dloss':>13} {'host':>6}")
    for r in results:
        if "losses" not in r:
            print(f"{r['name']:<14} {r['nproc']:>4}  failed: {r.get('error', '')[:80]}")
            continue
        ratio = r["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"] if "losses" in ref else float("nan")
        dloss = max((abs(a - b) / abs(b) for a, b in zip(r["losses"], ref.get("losses", []))), default=float("nan"))
        r["ratio_vs_ref"], r["max_rel_loss_diff"] = ratio, dloss
        print(f"{r['name']:<14} {r['nproc']:>4} {r['tokens_per_s_per_gpu']:>11,.0f} {ratio:>7.1%} "
              f"{r['tflops_per_gpu']:>11.1f} {r['mem_gb']:>7.1f} {dloss:>13.2e} {r['host_share']:>6.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "iters": args.iters, "global_batch": args.global_batch,
                       "results": results}, f, indent=1)
    return 0 if all("losses" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
