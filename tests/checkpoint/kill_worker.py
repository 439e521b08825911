"""Worker for test_kill.py: one rank of a 2-rank gloo job that commits a checkpoint at step 1, then
starts a deliberately slow async save of step 2 and waits for it. The test SIGKILLs a rank while
the files of step 2 are being written.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python -m tests.checkpoint.kill_worker ROOT
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist


def build(seed: int = 0):
    from megacore.models.gpt import GPTModel
    from tests.checkpoint.layouts import tiny_config

    model = GPTModel(tiny_config(num_layers=2), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(p.shape, generator=gen),
                        "exp_avg_sq": torch.rand(p.shape, generator=gen)}
    return model, opt


def main(root: str) -> None:
    import megacore.checkpoint.serialize as ser
    from megacore.checkpoint import save_checkpoint

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    model, opt = build()
    save_checkpoint(root, 1, model, opt)
    real = ser._write_chunk

    def slow(f, hasher, data):  # announce that step 2 is being written, then crawl
        open(os.path.join(root, f"writing_{rank}"), "w").close()
        time.sleep(0.2)
        real(f, hasher, data)
    if rank == 1:  # rank 0 finishes its files and waits in the commit for rank 1, which gets killed
        ser._write_chunk = slow
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    handle = save_checkpoint(root, 2, model, opt, async_save=True)
    try:
        handle.wait()
        status = "committed"
    except Exception as e:
        status = f"error: {type(e).__name__}: {e}"
    with open(os.path.join(root, f"status_{rank}"), "w") as f:
        f.write(status)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
