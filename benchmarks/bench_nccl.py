"""Collective bandwidth at the message sizes training uses (run under torchrun, one GPU a rank).

    torchrun --nproc-per-node 2 benchmarks/bench_nccl.py
    torchrun --nproc-per-node 2 benchmarks/bench_nccl.py --sizes 32 --dtypes bf16 --copy-engine --graph

Prints, per collective and size, the time and the bus bandwidth (nccl-tests' definition), so the
protocol NCCL picks (see NCCL_PROTO, NCCL_MIN_NCHANNELS) can be judged against the 1 GiB all-reduce
figure of the card.

``--copy-engine`` adds torch's symmetric-memory "low-contention" all-gather and reduce-scatter
(``torch.ops.symm_mem._low_contention_*``): peer-to-peer copies by the GPU's copy engines over
NVLink, no SMs except a barrier and, for the reduce-scatter, the final local sum. ``--graph`` times
the sequence-parallel pattern (all-gather then reduce-scatter of one activation, 32 times) captured
in one CUDA graph, as the trainer runs it with ``compile_mode=reduce-overhead``.
"""

import argparse
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


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,16,32,64,256,1024", help="MiB, comma-separated")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--copy-engine", action="store_true")
    ap.add_argument("--graph", action="store_true")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    group_name = dist.group.WORLD.group_name
    say = (lambda *s: print(*s, flush=True)) if rank == 0 else (lambda *s: None)
    say(f"world {n}; NCCL env: " + " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NCCL")))
    ce = None
    if a.copy_engine:
        try:
            from torch.distributed._symmetric_memory import enable_symm_mem_for_group

            enable_symm_mem_for_group(group_name)
            ce = torch.ops.symm_mem
            ce._low_contention_all_gather  # noqa: B018 -- raises if this torch lacks the ops
        except (ImportError, AttributeError, RuntimeError) as e:
            say(f"copy-engine collectives unavailable: {e}")
            ce = None
    f = (n - 1) / n
    for mb in (int(s) for s in a.sizes.split(",")):
        for name in a.dtypes.split(","):
            dtype = DTYPES[name]
            numel = mb * 2**20 // torch.empty((), dtype=dtype).element_size()
            x = torch.randn(numel, device="cuda").to(dtype)
            out = torch.empty(numel // n, device="cuda", dtype=dtype)
            ar = bench(lambda: dist.all_reduce(x))
            rs = bench(lambda: dist.reduce_scatter_tensor(out, x))
            ag = bench(lambda: dist.all_gather_into_tensor(x, out))
            say(f"{mb:>5} MiB {name:>5} nccl: all_reduce {ar * 1e3:7.3f} ms {2 * f * mb / 1024 / ar:6.1f} GB/s | "
                f"reduce_scatter {rs * 1e3:7.3f} ms {f * mb / 1024 / rs:6.1f} GB/s | "
                f"all_gather {ag * 1e3:7.3f} ms {f * mb / 1024 / ag:6.1f} GB/s")
            if ce is not None:
                wait = torch.ops._c10d_functional.wait_tensor
                rs_ce = bench(lambda: wait(ce._low_contention_reduce_scatter(x, "sum", group_name)))
                ag_ce = bench(lambda: wait(ce._low_contention_all_gather(out, group_name)))
                ok_ag = torch.equal(wait(ce._low_contention_all_gather(out, group_name)),
                                    (dist.all_gather_into_tensor(x, out), x)[1])
                say(f"{mb:>5} MiB {name:>5}   CE: {'':>33}| reduce_scatter {rs_ce * 1e3:7.3f} ms "
                    f"{f * mb / 1024 / rs_ce:6.1f} GB/s | all_gather {ag_ce * 1e3:7.3f} ms "
                    f"{f * mb / 1024 / ag_ce:6.1f} GB/s | all_gather equals NCCL's: {ok_ag}")
    if a.graph:
        _graph_bench(a, n, group_name, ce, say)
    dist.barrier()
    dist.destroy_process_group()


def _graph_bench(a, n, group_name, ce, say):
    """32 x (all-gather a [T/n, H] bf16 shard, then reduce-scatter a [T, H] tensor), as one CUDA graph."""
    tokens, hidden = 4 * 2048, 2048
    shard = torch.randn(tokens // n, hidden, device="cuda", dtype=torch.bfloat16)
    gathered = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    scattered = torch.empty_like(shard)

    def nccl(s):
        dist.all_gather_into_tensor(gathered, s)
        dist.reduce_scatter_tensor(scattered, gathered * 1.0)
        return scattered.clone()

    kinds = {"nccl": nccl}
    if ce is not None:
        wait = torch.ops._c10d_functional.wait_tensor
        kinds["copy-engine"] = lambda s: wait(ce._low_contention_reduce_scatter(
            wait(ce._low_contention_all_gather(s, group_name)) * 1.0, "sum", group_name))
    for name, fn in kinds.items():
        def body():
            s = shard
            for _ in range(32):
                s = fn(s)
            return s
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()  # warm-up outside capture (allocates the symmetric workspace)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                result = body()
            t = bench(g.replay, iters=10)
            expect = shard * n**32  # each round trip multiplies by n (gather, then sum over n ranks)
            say(f"CUDA graph, {name}: 32 x (all-gather + reduce-scatter of {tokens}x{hidden} bf16): {t * 1e3:.3f} ms, "
                f"{t / 64 * 1e6:.1f} us per collective; result exact: {torch.equal(result, expect)}")
        except Exception as e:  # report, keep the other variant
            say(f"CUDA graph, {name}: failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
