"""Time one 32 MiB reduce-scatter and all-gather on the world group and on megacore's TP group, and
name the NCCL kernels (is a collective slow by itself, or only inside a training step?).

    torchrun --nproc-per-node 2 benchmarks/nccl_groups.py
"""
import os

import torch
import torch.distributed as dist
from bench_nccl import bench  # seconds per call of fn, CUDA-synchronized (same folder)
from torch.profiler import ProfilerActivity, profile

import megacore.parallel as P


def main():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    state = P.initialize(tensor=2)
    x = torch.randn(4, 2048, 2048, device="cuda", dtype=torch.bfloat16)  # 32 MiB, one SP activation
    full = torch.empty(8, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    for name, group in (("world", None), ("tp", state.tp_group)):
        rs = 1e3 * bench(lambda: dist.reduce_scatter_tensor(x.new_empty(2, 2048, 2048), x, group=group))
        ag = 1e3 * bench(lambda: dist.all_gather_into_tensor(full, x, group=group))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dist.reduce_scatter_tensor(x.new_empty(2, 2048, 2048), x, group=group)
            dist.all_gather_into_tensor(full, x, group=group)
            torch.cuda.synchronize()
        kernels = sorted({e.name[:60] for e in prof.events() if "nccl" in e.name.lower() and "Kernel" in e.name})
        if dist.get_rank() == 0:
            print(f"{name}: RS 32MiB {rs:.3f} ms, AG 32MiB {ag:.3f} ms, kernels {kernels}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
