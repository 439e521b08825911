"""One TP2 transformer layer's four sequence-parallel linears (1B shapes), forward + backward,
captured in a CUDA graph: NCCL collectives then matmuls (the reference path of
megacore.parallel.sp_overlap) vs copy-engine transfers overlapped with the matmuls, vs the matmuls
alone (no communication: the bound).

    torchrun --nproc-per-node 2 benchmarks/bench_sp_overlap.py
"""

import os
import time

import torch
import torch.distributed as dist


def main():
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    from megacore.parallel import sp_overlap

    group, t = dist.group.WORLD, dist.get_world_size()
    on = sp_overlap.enable(group)
    tokens, hidden, qkv, ffn = 4 * 2048, 2048, 3 * 2048, 2 * 5632
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    mk = lambda *s: (torch.randn(*s, device="cuda", dtype=dt, generator=g) * 0.02).requires_grad_(True)  # noqa: E731
    x = mk(1, tokens // t, hidden)
    w_qkv, w_proj = mk(qkv // t, hidden), mk(hidden, hidden // t)
    w_fc1, w_fc2 = mk(ffn // t, hidden), mk(hidden, ffn // 2 // t)

    def layer(comm: bool):
        if comm:
            h = sp_overlap.all_gather_linear(x, w_qkv, group)
            a = sp_overlap.linear_reduce_scatter(h[..., : hidden // t].contiguous(), w_proj, group)
            f = sp_overlap.all_gather_linear(a, w_fc1, group)
            o = sp_overlap.linear_reduce_scatter(f[..., : ffn // 2 // t].contiguous(), w_fc2, group)
        else:  # the same matmuls on full token counts, no communication
            xf = x.repeat(1, t, 1)
            h = xf @ w_qkv.t()
            a = (h[..., : hidden // t] @ w_proj.t())[:, : tokens // t]
            f = a.repeat(1, t, 1) @ w_fc1.t()
            o = (f[..., : ffn // 2 // t] @ w_fc2.t())[:, : tokens // t]
        o.float().sum().backward()

    results = {}
    for name, comm, ce in (("matmuls only", False, False), ("NCCL then matmul", True, False),
                           ("copy engine, overlapped", True, True)):
        if ce and not on:
            continue
        (sp_overlap._COPY_ENGINE_GROUPS.add if ce else sp_overlap._COPY_ENGINE_GROUPS.discard)(group.group_name)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(comm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(8):
                layer(comm)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        results[name] = (time.perf_counter() - start) / 80 * 1e3
    if dist.get_rank() == 0:
        print(f"one layer's 4 SP linears, fwd+bwd, tokens {tokens}, hidden {hidden}, TP{t}, bf16, CUDA graph:")
        for name, ms in results.items():
            print(f"  {name:<26} {ms:7.3f} ms")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
