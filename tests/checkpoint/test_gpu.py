"""GPU path of async save: pinned host snapshot (the only stall), background write, exact reload on
GPU and on CPU."""

import pytest
import torch

from megacore.checkpoint import load_checkpoint, save_checkpoint
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config


@pytest.mark.gpu
def test_async_save_from_gpu_snapshots_and_reloads(tmp_path):
    cfg = tiny_config(num_layers=2)
    model = GPTModel(cfg, seed=0).cuda().to(torch.bfloat16)
    want = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    handle = save_checkpoint(str(tmp_path), 1, model, async_save=True)
    assert handle._thread is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the files are written
    handle.wait()
    assert handle.stall_s > 0
    gpu = GPTModel(cfg, seed=1).cuda().to(torch.bfloat16)
    load_checkpoint(str(tmp_path), gpu)
    cpu = GPTModel(cfg, seed=2)  # fp32 on CPU: values are the bf16 ones, upcast
    load_checkpoint(str(tmp_path), cpu)
    for (n, p), (_, q) in zip(gpu.named_parameters(), cpu.named_parameters()):
        assert torch.equal(p.cpu(), want[n]) and torch.equal(q, want[n].float()), n
