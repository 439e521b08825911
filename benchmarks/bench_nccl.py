"""NCCL collective bandwidth at the message sizes training uses (run under torchrun, one GPU a rank).

    torchrun --nproc-per-node 2 benchmarks/bench_nccl.py

Prints, per collective and size, the time and the bus bandwidth (nccl-tests' definition), so the
protocol NCCL picks (see NCCL_PROTO) can be judged against the 1 GiB all-reduce figure of the card.
"""

import os
import time

import torch
import torch.distributed as dist


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        print(f"world {n}; NCCL env: " + " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NCCL")))
    for mb in (4, 16, 32, 64, 256, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            numel = mb * 2**20 // torch.empty((), dtype=dtype).element_size()
            x = torch.randn(numel, device="cuda").to(dtype)
            out = torch.empty(numel // n, device="cuda", dtype=dtype)
            ar = bench(lambda: dist.all_reduce(x))
            rs = bench(lambda: dist.reduce_scatter_tensor(out, x))
            ag = bench(lambda: dist.all_gather_into_tensor(x, out))
            f = (n - 1) / n
            if rank == 0:
                print(f"{mb:>5} MiB {str(dtype)[6:]:>8}: all_reduce {ar * 1e3:7.3f} ms {2 * f * mb / 1024 / ar:6.1f} GB/s | "
                      f"reduce_scatter {rs * 1e3:7.3f} ms {f * mb / 1024 / rs:6.1f} GB/s | "
                      f"all_gather {ag * 1e3:7.3f} ms {f * mb / 1024 / ag:6.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
