"""How long an async checkpoint save blocks training (the device->host snapshot), save after save.

Builds DESIGN.md's 1B Llama-style GPTModel (L=16, h=2048, 16 heads, ffn 5632, vocab 32000, seq 2048)
in bf16 on the GPU, wraps it in DistributedDataParallel (one process, no group: fp32 main grads)
and MixedPrecisionOptimizer (fp32 masters + AdamW moments), runs one forward/backward/step so every
state exists, then saves ``--saves`` times with ``save_checkpoint(..., async_save=True)``, waiting
for each save to commit before the next. Per save it prints the foreground stall
(``handle.stall_s``), the part of it spent in the snapshot, in allocating pinned buffers (the first
save only, or none with ``--prepare``), the GPU time of the copy pass, the bytes copied and GB/s.

    python benchmarks/bench_checkpoint_stall.py                   # H100: the 1B model, 3 saves
    python benchmarks/bench_checkpoint_stall.py --prepare         # buffers reserved before the first save
    python benchmarks/bench_checkpoint_stall.py --layers 4        # about one TP2xPP2 rank's share (~4.7 GB)
    python benchmarks/bench_checkpoint_stall.py --small           # CPU smoke run (tiny model)

The whole 1B model on one GPU snapshots ~13.4 GB per save (bf16 weights + fp32 master + two fp32
moments = 14 bytes per parameter). The files go to ``--dir`` (default: a temporary directory in
/dev/shm when it has room, else in the system temp dir; removed at the end unless ``--keep``); the
storage only changes how long the background write takes, not the stall. ``--json PATH`` writes the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

GB = 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny model on CPU (smoke run)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (16 for the 1B config)")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--prepare", action="store_true",
                   help="reserve the pinned buffers (prepare_snapshot_buffers) before the first save")
    p.add_argument("--cpu-pool", action="store_true",
                   help="on CPU, snapshot through a pageable PinnedPool as GPU saves do (shows buffer reuse)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    p.add_argument("--json", default=None, help="write the results to this file")
    return p.parse_args(argv)


def model_config(a):
    import megacore

    if a.small:
        kw = dict(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=8, ffn_hidden_size=1376,
                  vocab_size=8000, seq_length=128)
    else:
        kw = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=16, ffn_hidden_size=5632,
                  vocab_size=32000, seq_length=2048)
    if a.layers is not None:
        kw["num_layers"] = a.layers
    return megacore.TransformerConfig(vocab_padding_multiple=128, **kw)


def build(a, device):
    """GPTModel (bf16, deterministic init on ``device``) + DDP + MixedPrecisionOptimizer, after one step."""
    from megacore.distributed.ddp import DistributedDataParallel
    from megacore.kernels._dispatch import kernel_backend
    from megacore.models.gpt import GPTModel
    from megacore.models.init import materialize
    from megacore.optim.optimizer import MixedPrecisionOptimizer

    cfg = model_config(a)
    with torch.device("meta"):
        model = GPTModel(cfg)
    materialize(model, cfg, seed=0, device=device, dtype=torch.bfloat16)
    ddp = DistributedDataParallel(model)  # no group: one process, fp32 main grads
    opt = MixedPrecisionOptimizer(ddp, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, clip_grad=1.0,
                                  master_weights=True)
    seq = min(cfg.seq_length, 256)  # the step only has to create grads and optimizer state
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
    with kernel_backend("torch"):  # no Triton compilation: the step's speed is not what is measured
        loss = ddp(ids, labels=ids, reduction="mean")
        loss.backward()
    opt.step()
    opt.zero_grad()
    n_params = sum(p.numel() for p in model.parameters())
    return cfg, ddp, opt, n_params, float(loss.detach())


def default_dir(nbytes: int) -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 2.5 * nbytes:  # keep_last=1: at most two checkpoints at a time
            return tempfile.mkdtemp(prefix="megacore-ckpt-bench-", dir=shm)
    return tempfile.mkdtemp(prefix="megacore-ckpt-bench-")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = a.device or ("cpu" if a.small else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: pass --small (or --device cpu) for a CPU run")
    from megacore.checkpoint import prepare_snapshot_buffers, save_checkpoint, wait_for_pending

    if a.cpu_pool and torch.device(device).type == "cpu":
        import megacore.checkpoint.snapshot as snapshot

        snapshot._POOL = snapshot.PinnedPool(pin=False)
        snapshot.uses_pool = lambda items: True

    t0 = time.perf_counter()
    cfg, ddp, opt, n_params, loss = build(a, device)
    sync(device)
    state_bytes = sum(p.numel() * p.element_size() for p in ddp.parameters()) + opt.state_bytes()
    print(f"model: {n_params / 1e9:.3f}B params (L={cfg.num_layers}, h={cfg.hidden_size}), bf16 on {device}, "
          f"fp32 masters + AdamW moments: {state_bytes / GB:.2f} GB to snapshot; built + 1 step in "
          f"{time.perf_counter() - t0:.1f}s (loss {loss:.3f})")
    directory = a.dir or default_dir(state_bytes)
    print(f"checkpoint dir: {directory}")
    results = {"device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
               "params": n_params, "layers": cfg.num_layers, "state_bytes": state_bytes, "dir": directory,
               "prepare": None, "saves": []}
    try:
        if a.prepare:
            t = time.perf_counter()
            stats = prepare_snapshot_buffers([ddp], opt)
            took = time.perf_counter() - t
            results["prepare"] = {"seconds": took, "alloc_bytes": stats.alloc_bytes if stats else 0}
            print(f"prepare_snapshot_buffers: {(stats.alloc_bytes if stats else 0) / GB:.2f} GB "
                  f"{'pinned' if stats and stats.pinned else 'not pinned'} in {took:.2f}s")
        for i in range(a.saves):
            step = i + 1
            sync(device)  # queued training work is not the checkpoint's stall
            h = save_checkpoint(directory, step, [ddp], opt, scheduler_state={"step": step}, async_save=True,
                                keep_last=1)
            t = time.perf_counter()
            h.wait()
            wait_s = time.perf_counter() - t
            r = {"step": step, "stall_s": h.stall_s, "snapshot_s": h.snapshot_s, "alloc_s": h.alloc_s,
                 "alloc_bytes": h.alloc_bytes, "d2h_s": h.d2h_s, "bytes": h.snapshot_bytes,
                 "stall_GBps": h.snapshot_bytes / h.stall_s / GB if h.stall_s else None,
                 "snapshot_GBps": h.snapshot_bytes / h.snapshot_s / GB if h.snapshot_s else None,
                 "d2h_GBps": h.snapshot_bytes / h.d2h_s / GB if h.d2h_s else None,
                 "write_s": h.write_s, "wait_s": wait_s, "file_bytes": h.bytes_written}
            results["saves"].append(r)
            d2h = f", copy pass {h.d2h_s:.3f}s on the GPU = {r['d2h_GBps']:.1f} GB/s" if h.d2h_s else ""
            print(f"save {step}: stall {h.stall_s:.3f}s for {h.snapshot_bytes / GB:.3f} GB = {r['stall_GBps']:.1f} GB/s "
                  f"(snapshot {h.snapshot_s:.3f}s, of which buffer allocation {h.alloc_s:.3f}s for "
                  f"{h.alloc_bytes / GB:.3f} GB{d2h}); background write {h.write_s:.2f}s, then waited "
                  f"{wait_s:.2f}s for the commit")
    finally:
        wait_for_pending()
        if not a.keep and a.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
