"""Context parallelism: per-rank activation memory of one training step, per ``parallel.context_mode``.

DESIGN.md's 1B config (L=16, h=2048, 16 heads, 16 KV heads, ffn 5632, vocab 32000; bf16) at seq 32768,
one sequence, for CP = 1, 2, 4 in each mode (allgather, ring, a2a, a2a+ring with all-to-all groups
of 2). Each (CP, mode) is its own set of CP processes (NCCL on GPUs, one per rank; gloo on CPU),
built by the composition root (``compose.build_model_chunks``), running forward + backward of its
load-balanced share of the sequence. Printed per run, the largest over the ranks:

- ``saved MB``: the bytes of the distinct tensors autograd keeps for the backward (parameters not
  counted): the activations that CP should cut to 1/CP;
- on CUDA ``peak MB``: the peak allocated during the step minus what was allocated before it
  (activations plus transients: gathered K/V, logits, gradients);
- ``loss`` (the ranks' shares summed: equal across modes up to bf16 rounding) and ``step ms``.

    python benchmarks/bench_cp_memory.py                                   # GPUs: CP 1, 2, 4 that fit
    python benchmarks/bench_cp_memory.py --cp 1,2 --modes allgather,ring   # what 2 GPUs allow
    python benchmarks/bench_cp_memory.py --tiny                            # CPU, tiny model (gloo)

A CP size above the number of GPUs is skipped (on CPU every size runs, as processes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ONE_B = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=16, ffn_hidden_size=5632,
             vocab_size=32000)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SavedBytes:
    """Counts the distinct storages autograd saves for backward (parameters excluded)."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cuda = args.device == "cuda"
    try:
        if cuda:
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo")
        queue.put((rank, _measure(rank, world, args)))
    except Exception as e:  # report, including OOM, instead of hanging the parent
        queue.put((rank, {"error": f"{type(e).__name__}: {str(e)[:300]}"}))
    finally:
        import megacore.parallel as P

        P.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


def _measure(rank, world, args) -> dict:
    import megacore.parallel as P
    from megacore.compose import build_model_chunks
    from megacore.config import ParallelConfig, RunConfig, TrainConfig, TransformerConfig
    from megacore.parallel.context_parallel import split_sample_for_cp

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = dict(TINY if args.tiny else ONE_B)
    if args.layers:
        shape["num_layers"] = args.layers
    a2a = args.a2a_size if args.mode == "a2a+ring" else None
    cfg = RunConfig(model=TransformerConfig(**shape, seq_length=args.seq),
                    parallel=ParallelConfig(context=world, context_mode=args.mode, context_a2a_size=a2a),
                    train=TrainConfig(seed=1, global_batch_size=1, micro_batch_size=1))
    cfg.validate(world_size=world)
    state = P.initialize(context=world)
    (model,) = build_model_chunks(cfg, state, device=device, dtype=dtype)
    g = np.random.default_rng(0)
    sample = {"tokens": g.integers(0, shape["vocab_size"], args.seq), "labels": g.integers(0, shape["vocab_size"], args.seq)}
    if world > 1:
        sample = split_sample_for_cp(sample, world, state.cp_rank)
    ids, labels = (torch.from_numpy(np.asarray(sample[k])).to(device)[None] for k in ("tokens", "labels"))
    kwargs = {"position_ids": torch.from_numpy(sample["position_ids"]).to(device)[None]} if world > 1 else {}

    def step(counter=None):
        hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t) if counter else None
        if hooks:
            with hooks:
                loss = model(ids, labels=labels, reduction="sum", **kwargs) / args.seq
        else:
            loss = model(ids, labels=labels, reduction="sum", **kwargs) / args.seq
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach().float()

    for _ in range(args.warmup):
        step()
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
    counter = SavedBytes(model.parameters())
    t0 = time.perf_counter()
    loss = step(counter)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - static) / 2**20
    out["step_ms"] = (time.perf_counter() - t0) * 1e3
    out["saved_mb"] = counter.total / 2**20
    dist.all_reduce(loss)
    out["loss"] = loss.item()
    return out


def run(cp: int, mode: str, args) -> dict:
    args = argparse.Namespace(**{**vars(args), "mode": mode})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, cp, port, args, queue), daemon=True) for r in range(cp)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + args.timeout
    while len(results) < cp and time.time() < deadline:
        try:
            r, res = queue.get(timeout=5)
            results[r] = res
        except Exception:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    errors = [res["error"] for res in results.values() if "error" in res]
    if errors or len(results) < cp:
        return {"error": errors[0] if errors else "a rank died or timed out"}
    merged = {k: max(res[k] for res in results.values()) for k in results[0] if k != "loss"}
    merged["loss"] = results[0]["loss"]
    return merged


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", default="1,2,4", help="comma list of context-parallel sizes")
    p.add_argument("--modes", default="allgather,ring,a2a,a2a+ring", help="comma list of parallel.context_mode")
    p.add_argument("--a2a-size", type=int, default=2, help="parallel.context_a2a_size for a2a+ring")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 32768; --tiny: 256)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.seq = args.seq or (256 if args.tiny else 32768)
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    rows = []
    print(f"{'cp':>3} {'mode':>10} {'saved MB':>10} {'peak MB':>10} {'loss':>9} {'step ms':>9}")
    for cp in (int(x) for x in args.cp.split(",")):
        if gpus is not None and cp > gpus:
            print(f"{cp:>3} {'':>10} skipped: {gpus} GPU(s)")
            continue
        for mode in (["allgather"] if cp == 1 else args.modes.split(",")):
            if mode == "a2a+ring" and (cp % args.a2a_size or cp == args.a2a_size):
                continue  # no ring across groups at this size
            r = {"cp": cp, "mode": mode if cp > 1 else "none", "seq": args.seq, **run(cp, mode, args)}
            rows.append(r)
            if "error" in r:
                print(f"{cp:>3} {r['mode']:>10} {r['error']}")
                continue
            peak = f"{r['peak_mb']:10.0f}" if "peak_mb" in r else f"{'-':>10}"
            print(f"{cp:>3} {r['mode']:>10} {r['saved_mb']:10.1f} {peak} {r['loss']:9.4f} {r['step_ms']:9.1f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
