"""Profile a few training steps of a real ``megacore train`` setup (any layout) with torch.profiler.

    torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/llama_1b_gpu.yaml parallel.tensor=2 \
        parallel.sequence_parallel=true compile=false --out $OUT/prof_tp2

Rank 0 prints the top CUDA kernels and CPU ops by self time and writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of union ``a`` not covered by union ``b`` (both sorted, disjoint)."""
    out, j = 0.0, 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out += b[k][0] - cur
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out += e - cur
    return out


def timeline_breakdown(trace_path: str, steps: int) -> str:
    """Per-step GPU time from a Chrome trace: compute busy, communication busy, communication not
    covered by any compute kernel (exposed), and time when no kernel runs at all (idle)."""
    import json

    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    if not events:
        return "no kernel events in the trace"
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if "nccl" in e["name"].lower()])
    compute_events = [e for e in events if "nccl" not in e["name"].lower()]
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in compute_events])
    gemm = sum(e["dur"] for e in compute_events
               if any(k in e["name"].lower() for k in ("gemm", "sm90", "cutlass", "xmma", "matmul")))
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = _union(comm + compute)
    ms = lambda us: f"{us / steps / 1e3:.1f} ms"  # noqa: E731
    lines = [f"per step: span {ms(span)}, compute busy {ms(_length(compute))} (GEMM kernels {ms(gemm)}), "
             f"comm busy {ms(_length(comm))}, comm exposed {ms(_minus(comm, compute))}, "
             f"idle {ms(span - _length(busy))}"]
    # Where the idle time sits: gaps between busy stretches, by the kernels on either side.
    by_end = sorted(events, key=lambda e: e["ts"] + e["dur"])
    by_start = sorted(events, key=lambda e: e["ts"])
    ends = [e["ts"] + e["dur"] for e in by_end]
    starts = [e["ts"] for e in by_start]
    import bisect

    gaps: dict[tuple[str, str], list[float]] = {}
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        before = by_end[max(0, bisect.bisect_right(ends, gap_start) - 1)]["name"][:48]
        after = by_start[min(len(starts) - 1, bisect.bisect_left(starts, gap_end))]["name"][:48]
        gaps.setdefault((before, after), []).append(gap_end - gap_start)
    top = sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:10]
    lines.append("largest idle gaps per step (total, count, between kernel -> kernel):")
    lines += [f"  {ms(sum(v))} x{len(v) / steps:.0f}  {a} -> {b}" for (a, b), v in top]
    return "\n".join(lines)


def main() -> int:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megacore.cli import _init_distributed
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/megacore-profile")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--cuda-only", action="store_true", help="record only GPU kernels (realistic idle time)")
    a = ap.parse_args()
    cfg = load_run_config(a.config, [*a.overrides, "checkpoint.dir=null", "checkpoint.interval=0",
                                     f"train.iters={a.warmup + a.steps + 1}"])
    _init_distributed()
    t = Trainer(cfg)
    t.setup()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for s in range(a.warmup):
        t.train_step(s)
    torch.cuda.synchronize()
    start = time.time()
    # --cuda-only: no CPU-op events, so the host runs at nearly its unprofiled speed and the idle
    # gaps in the timeline are the real ones.
    activities = [ProfilerActivity.CUDA] if a.cuda_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for s in range(a.warmup, a.warmup + a.steps):
            t.train_step(s)
        torch.cuda.synchronize()
    dt = (time.time() - start) / a.steps
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        print(f"step {dt * 1e3:.1f} ms (profiled), {tokens / dt:,.0f} tokens/s total")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        trace = os.path.join(a.out, f"trace_rank{rank}.json")
        prof.export_chrome_trace(trace)
        print(timeline_breakdown(trace, a.steps))
    from megacore.training.compile import release_cuda_graphs

    release_cuda_graphs(cfg, t.device)  # else a run with CUDA graphs hangs in destroy_process_group
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
