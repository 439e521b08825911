"""``compile_mode`` reaches torch.compile for every compiled region the trainer builds."""

import os

import torch

from megacore.config import load_run_config
from megacore.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compile_mode_is_passed_to_torch_compile(monkeypatch, tmp_path):
    modes = []

    def recording_compile(fn=None, *args, mode=None, **kwargs):
        modes.append(mode)
        return fn if fn is not None else (lambda f: f)  # no real compilation: the plumbing is under test

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, mode=None, **k: modes.append(mode))
    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                           "model.vocab_size=128", "model.seq_length=16", "data.source=mock", "train.iters=1",
                           "compile=true", "compile_mode=max-autotune-no-cudagraphs", f"log.dir={tmp_path}",
                           "checkpoint.dir=null"])
    Trainer(cfg).setup()
    assert modes and set(modes) == {"max-autotune-no-cudagraphs"}, modes
    assert len(modes) == 3  # two layers and the loss head
