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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
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
        prof.export_chrome_trace(os.path.join(a.out, f"trace_rank{rank}.json"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
