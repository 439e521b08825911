"""A training step without host syncs: the optimizer decides clipping and skipping on the device
(torch's fused AdamW ``grad_scale``/``found_inf``), ``StepInfo`` is read lazily, the loss may be
divided by a device token count, and the trainer reads each step one step late.

Syncs cannot be counted on CPU, so these tests check what makes them unnecessary: the fused path
gives the numbers of the plain formula, unread values stay unread until asked, and the deferred
loop still stops, logs and refuses to checkpoint at the right step."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from megacore.pipeline.schedules import masked_loss_sum
from megacore.optim.step_info import read_scalars
from megacore.optim.optimizer import MixedPrecisionOptimizer, StepInfo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------- optimizer
def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype)


def _reference_step(params, grads, opt, clip):
    """The plain formula: torch's clip_grad_norm_ on fp32 copies, skip on a non-finite norm, AdamW."""
    for p, g in zip(params, grads):
        p.grad = g.float().clone()
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if torch.isfinite(norm):
        opt.step()
    return float(norm)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [0.0, 0.3], ids=["noclip", "clip"])
def test_step_matches_clip_grad_norm_and_adamw(fused, dtype, clip):
    """Clipping (active on every step at clip=0.3) and the skip of a NaN-gradient step give the
    parameters of clip_grad_norm_ + torch.optim.AdamW on fp32 copies; the fused path only differs
    by rounding (it divides by the inverse clip factor instead of multiplying)."""
    model = _model(dtype)
    opt = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.1, clip_grad=clip, fused=fused)
    assert opt.fused == fused
    ref = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    decay = [r for r, p in zip(ref, model.parameters()) if p.dim() >= 2]
    no_decay = [r for r, p in zip(ref, model.parameters()) if p.dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    clipped = 0
    for step in range(6):
        x = torch.randn(32, 8, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().mul(10).backward()
        if step == 3:  # a non-finite gradient: this step must be skipped
            next(model.parameters()).grad[0, 0] = float("nan")
        grads = [p.grad.detach().clone() for p in model.parameters()]
        masters_before = [f.master.clone() for f in opt.fragments]
        info = opt.step()
        ref_norm = _reference_step(ref, grads, ref_opt, clip)
        assert info.ready == (not fused)  # fused: nothing read from the device yet
        assert info.skipped == (step == 3)
        if step == 3:
            assert info.grad_norm != info.grad_norm  # nan
            for f, before in zip(opt.fragments, masters_before):
                assert torch.equal(f.master, before), f.name
        else:
            assert info.grad_norm == pytest.approx(ref_norm, rel=1e-6)
            clipped += 0 < clip < ref_norm
        for f, r in zip(opt.fragments, ref):
            torch.testing.assert_close(f.master.float(), r.detach().view(-1), rtol=1e-5, atol=1e-6)
            if f.has_master_copy:  # the weights are the masters rounded to bf16
                assert torch.equal(f.model_view(), f.master.to(dtype))
    assert opt.num_steps == 5
    assert all(int(s["step"]) == 5 for s in opt.state.values())
    assert clipped == (5 if clip > 0 else 0)  # clipping was active on every good step


def test_fused_and_unfused_paths_agree_to_rounding():
    """The same run through both paths: identical without clipping, rounding-close with it."""
    out = {}
    for fused in (False, True):
        for clip in (0.0, 0.3):
            model = _model(torch.float32)
            opt = MixedPrecisionOptimizer(model, lr=1e-2, clip_grad=clip, fused=fused)
            gen = torch.Generator().manual_seed(2)
            for _ in range(4):
                opt.zero_grad()
                model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
                opt.step()
            out[fused, clip] = torch.cat([p.detach().view(-1) for p in model.parameters()])
    torch.testing.assert_close(out[True, 0.0], out[False, 0.0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[True, 0.3], out[False, 0.3], rtol=1e-5, atol=1e-6)


def test_num_steps_counts_device_skips_lazily():
    model = _model(torch.float32)
    opt = MixedPrecisionOptimizer(model, lr=1e-2, clip_grad=1.0, fused=True)
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        if step in (1, 2):
            next(model.parameters()).grad[0, 0] = float("inf")
        opt.step()
    assert opt.num_steps == 2
    opt.num_steps = 7  # loading a checkpoint sets it
    assert opt.num_steps == 7


# ----------------------------------------------------------------------------------------- StepInfo
def test_stepinfo_reads_both_values_on_first_access():
    info = StepInfo(torch.tensor(0.0), torch.tensor(2.5), None)
    assert not info.ready and len(info.pending()) == 2
    assert "on device" in repr(info)
    assert info.grad_norm == 2.5  # one read resolves both
    assert info.ready and info.pending() == []
    assert info.skipped is False


def test_stepinfo_takes_values_read_elsewhere():
    """A caller that read the pending tensors with its own values hands the numbers back: they are
    used as given (the tensors are not read again)."""
    info = StepInfo(torch.tensor(0.0), torch.tensor(1.0), 8.0)
    assert info.resolve([1.0, 3.0]) is info
    assert (info.skipped, info.grad_norm, info.loss_scale) == (True, 3.0, 8.0)
    partly = StepInfo(False, torch.tensor(4.0), None)
    assert len(partly.pending()) == 1
    with pytest.raises(ValueError, match="1 pending"):
        partly.resolve([1.0, 2.0])
    assert partly.resolve([4.0]).grad_norm == 4.0


def test_stepinfo_with_host_values_is_ready():
    info = StepInfo(True, None, 1024.0)
    assert info.ready and info.pending() == []
    assert (info.skipped, info.grad_norm) == (True, None)


def test_read_scalars_passes_numbers_and_reads_tensors():
    values = [1.5, None, torch.tensor(2.0), torch.tensor([3], dtype=torch.int64), torch.tensor(True),
              torch.tensor(0.1, dtype=torch.float32)]
    out = read_scalars(values)
    assert out[:5] == [1.5, None, 2.0, 3.0, 1.0]
    assert out[5] == float(torch.tensor(0.1, dtype=torch.float32))  # fp32 -> float64 is exact


# ----------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_token_count_gives_the_same_loss_bits(device):
    """The loss divided by a device token count equals, bit for bit, the loss divided by the same
    count as a Python number (so moving the count to the device changes no number)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        token_loss = (torch.rand(2, 64, generator=gen) * 10).to(device)
        mask = (torch.rand(2, 64, generator=gen) > 0.3).float().to(device)
        count = float(torch.randint(1, 10 ** 6, (), generator=gen))
        for scale in (1.0, 2.0 ** 16, 3.0):
            as_float = masked_loss_sum(token_loss, mask, count / scale)
            as_tensor = masked_loss_sum(token_loss, mask, torch.tensor([count], dtype=torch.float64,
                                                                       device=device) / scale)
            assert torch.equal(as_float, as_tensor), (count, scale)


# ----------------------------------------------------------------------------------------- trainer
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=128", "model.seq_length=64", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.warmup_iters=4", "train.lr=3e-3", "train.eval_interval=0",
         "log.interval=5", "data.source=mock", "model.vocab_size=256"]


def _trainer(tmp_path, extra):
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          [*SMALL, f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={tmp_path / 'ckpt'}", *extra])
    return Trainer(cfg)


def _metric_steps(tmp_path):
    with open(tmp_path / "log" / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    return sorted(int(n.split("_")[1]) for n in os.listdir(root) if n.startswith("iter_")) if root.exists() else []


@pytest.mark.parametrize("bad_step", [3, 4])
def test_nan_found_one_step_late_names_its_step_and_saves_nothing_after(tmp_path, monkeypatch, bad_step):
    """A NaN loss at step k, read only after step k+1 was queued: the error names step k, the
    metrics stop at k-1 and no checkpoint later than k-1 exists (checkpoints every 2 steps: the bad
    step is a save step for k=4, the one before a save step for k=3)."""
    from megacore.training.contract import TrainingError
    from megacore.training.trainer import PendingStep

    t = _trainer(tmp_path, ["train.iters=8", "checkpoint.interval=2"])
    real, calls = t.train_step, []

    def poisoned(step):
        calls.append(step)
        pending = real(step)
        assert isinstance(pending, PendingStep) and not pending.ready  # the real step is read later
        if step == bad_step - 1:
            pending.loss_votes = pending.loss_votes.clone()
            pending.loss_votes[0] = float("nan")
        return pending

    monkeypatch.setattr(t, "train_step", poisoned)
    with pytest.raises(TrainingError, match=f"loss is nan at step {bad_step} .*lower train.lr"):
        t.run()
    # k=3: step 4 was queued before step 3 was read; k=4 is a save step, read before saving.
    assert calls == list(range(4))
    assert _metric_steps(tmp_path) == list(range(1, bad_step))
    assert _checkpoints(tmp_path) == [2]


def test_stop_request_is_agreed_with_the_loss_and_ends_one_step_later(tmp_path, monkeypatch):
    """A stop flag set during step 5 travels with step 5's loss, is read after step 6 was queued,
    so the run ends after step 6 with a checkpoint of step 6 and its metrics logged."""
    t = _trainer(tmp_path, ["train.iters=20", "checkpoint.interval=0"])
    real = t.train_step

    def step_then_signal(step):
        if step == 4:
            t.stop.requested = True
        return real(step)

    monkeypatch.setattr(t, "train_step", step_then_signal)
    summary = t.run()
    assert summary["stopped_by_signal"] and summary["steps"] == 6
    assert _metric_steps(tmp_path) == list(range(1, 7))
    assert _checkpoints(tmp_path) == [6]


def test_deferred_reads_change_no_number(tmp_path):
    """Reading every step at once (a step that resolves itself is read immediately) or one step
    late gives the same metrics."""
    deferred = _trainer(tmp_path / "a", ["train.iters=6", "checkpoint.interval=0"])
    deferred.run()
    eager = _trainer(tmp_path / "b", ["train.iters=6", "checkpoint.interval=0"])
    real = eager.train_step
    eager.train_step = lambda step: real(step).resolve()
    eager.run()

    def records(path):
        with open(path / "log" / "metrics.jsonl") as f:
            return [{k: r[k] for k in ("step", "loss", "grad_norm", "labelled_tokens", "lr")}
                    for r in map(json.loads, f)]

    assert records(tmp_path / "a") == records(tmp_path / "b")


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_optimizer_step_does_not_sync_on_cuda():
    """bf16 params, fp32 masters, fused AdamW with clipping: ``step()`` runs with torch's sync
    debug mode set to error (any device->host wait raises), and its numbers are read afterwards."""
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda().to(torch.bfloat16)
    opt = MixedPrecisionOptimizer(model, lr=1e-3, clip_grad=0.1)
    assert opt.fused
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
        if step == 2:
            next(model.parameters()).grad[0, 0] = float("nan")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            info = opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not info.ready
        assert info.skipped == (step == 2)
    assert opt.num_steps == 2


@pytest.mark.gpu
def test_train_step_queues_without_syncing_on_cuda(tmp_path):
    """A whole ``Trainer.train_step`` (bf16, one GPU) is queued under sync debug mode "error" after
    a warm-up step; its numbers are read afterwards. If this fails, the traceback names the op that
    still makes the host wait for the GPU."""
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          [*SMALL, "train.iters=4", "precision.dtype=bf16", "device=cuda", f"log.dir={tmp_path}"])
    t = Trainer(cfg)
    t.setup()
    try:
        t.train_step(0).resolve()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = t.train_step(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = pending.resolve()
        assert result.loss == result.loss and result.tokens > 0 and not result.skipped
    finally:
        t.metrics.close()
