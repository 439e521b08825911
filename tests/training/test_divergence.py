"""The divergence policy (``megacore.training.divergence``): non-finite and spiking steps are skipped
(weights untouched), logged in metrics.jsonl with a reason, end the run after
``train.max_skipped_steps`` in a row, and a model holding NaN/inf never becomes a checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from megacore.optim.optimizer import MixedPrecisionOptimizer
from megacore.training.divergence import DivergenceGuard
from megacore.training.contract import StepResult, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.seq_length=64", "model.vocab_size=256", "data.source=mock",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.warmup_iters=0", "train.eval_interval=0",
        "log.interval=1"]


def _metrics(log_dir) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoints(ckpt) -> tuple[list[str], str]:
    names = sorted(n for n in os.listdir(ckpt) if n.startswith("iter_"))
    with open(os.path.join(ckpt, "latest")) as f:
        return names, f.read().strip()


def _cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MEGACORE_CACHE=str(tmp_path / "cache"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "megacore", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------------------- the CLI
def test_diverged_run_exits_non_zero_logs_its_skips_and_keeps_latest(tmp_path, capsys):
    """A good run saves step 4. Resumed with train.lr=1e4 the updates blow the model up: every step
    after that has a NaN gradient (or loss) and is skipped, three in a row end the run with exit 1
    and one message, metrics.jsonl records the three skips with their reason, and `latest` still
    names step 4 (the final save is not written). train.lr=inf is refused before anything runs."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    base = ["train", os.path.join(ROOT, "configs/tiny_cpu.yaml"), *TINY, f"checkpoint.dir={ckpt}", f"log.dir={log}"]
    out = _cli([*base, "train.iters=4"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    before = _checkpoints(ckpt)
    assert before == (["iter_0000004"], "iter_0000004")

    out = _cli([*base, "train.iters=30", "train.lr=1e4"], tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "3 steps in a row were skipped" in out.stderr and "train.max_skipped_steps=3" in out.stderr
    assert _checkpoints(ckpt) == before
    records = _metrics(log)  # steps 1-4 of the first run, then the resumed run's
    assert [r["step"] for r in records] == list(range(1, records[-1]["step"] + 1)) and records[-1]["step"] < 30
    skipped = [r for r in records if r["skipped"]]
    assert skipped == records[-3:], [(r["step"], r["skipped"]) for r in records]
    for r in skipped:
        assert "non-finite" in r["skip_reason"], r
        assert not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])), r
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records[:-3])

    from megacore.cli import main  # refused before anything runs: the CLI function in this process

    assert main([*base, "train.iters=30", "train.lr=inf"]) == 2
    assert "train.lr=inf is not a finite number" in capsys.readouterr().err
    assert _checkpoints(ckpt) == before


def test_every_rank_of_a_sharded_run_stops_at_the_same_skipped_step(tmp_path):
    """DP=2 with the distributed optimizer (each rank steps a shard): the skip is decided from the
    global loss and grad norm, so both ranks skip the same steps and stop together (exit 1)."""
    log = tmp_path / "log"
    out = _cli(["train", "configs/tiny_cpu.yaml", *TINY, "train.micro_batch_size=4", "train.iters=30",
                "train.lr=1e4", "parallel.distributed_optimizer=true", f"log.dir={log}", "--nproc", "2"], tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    stops = [ln for ln in out.stderr.splitlines() if "steps in a row were skipped" in ln]
    assert sorted(ln.split("]")[0] for ln in stops) == ["[rank 0", "[rank 1"], out.stderr[-3000:]
    assert len({ln.split("] ", 1)[1] for ln in stops}) == 1  # the same steps on both ranks
    records = _metrics(log)
    assert [r["skipped"] for r in records][-4:] == [False, True, True, True]


# ----------------------------------------------------------------------------------------- the trainer
def _trainer(tmp_path, extra):
    from megacore.config import load_run_config
    from megacore.training.trainer import Trainer

    cfg = load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                          [*TINY, "train.lr=3e-3", f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                           *extra])
    return Trainer(cfg)


def _weights(t) -> list[torch.Tensor]:
    return [p.detach().clone() for c in t.chunks for p in c.parameters()]


def test_loss_spike_is_skipped_logged_and_changes_no_weight(tmp_path, monkeypatch):
    """With train.loss_spike_factor=2 over a window of 3: step 7's loss, made 10x larger on its way to
    the veto, is skipped -- weights and Adam's step count as before the step -- and logged as a
    spike; the steps around it are applied, and the spike does not enter the mean."""
    t = _trainer(tmp_path, ["train.iters=9", "checkpoint.interval=0", "train.loss_spike_factor=2",
                            "train.loss_spike_window=3"])
    real_sum, real_step, seen = t.sum_over_layout, t.train_step, {}

    def sum_over_layout(local, *extra):
        values = real_sum(local, *extra)
        if t._queueing == 6:
            values = values.clone()
            values[0] *= 10
        return values

    def train_step(step):
        t._queueing = step
        before, adam = _weights(t), t.optimizer.num_steps
        pending = real_step(step)
        seen[step] = (all(torch.equal(a, b) for a, b in zip(before, _weights(t))), t.optimizer.num_steps - adam)
        return pending

    monkeypatch.setattr(t, "sum_over_layout", sum_over_layout)
    monkeypatch.setattr(t, "train_step", train_step)
    t.run()
    records = _metrics(tmp_path / "log")
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["skipped"] for r in records] == [i == 6 for i in range(9)]
    assert records[6]["skip_reason"].startswith("loss spike")
    mean = sum(r["loss"] for r in records[2:5]) / 3  # steps 3-5: the window known when step 7 was queued
    assert f"{2 * mean:.4g}" in records[6]["skip_reason"]
    assert seen[6] == (True, 0)  # the vetoed step changed nothing
    assert all(seen[i] == (False, 1) for i in range(9) if i != 6)


def test_a_model_with_inf_weights_is_never_checkpointed(tmp_path, monkeypatch):
    """An update that overflows a weight while the loss and grad norm stay finite: the save of that
    step is refused (TrainingError naming the step), and `latest` stays at the step saved before."""
    t = _trainer(tmp_path, ["train.iters=9", "checkpoint.interval=3"])
    real = t.train_step

    def overflowing(step):
        pending = real(step)
        if step == 5:  # step 6, a save step: its loss and grad norm came before this "update"
            with torch.no_grad():
                next(t.chunks[0].parameters()).view(-1)[0] = float("inf")
        return pending

    monkeypatch.setattr(t, "train_step", overflowing)
    with pytest.raises(TrainingError, match="weights hold NaN or inf after step 6.*step 3"):
        t.run()
    assert _checkpoints(tmp_path / "ckpt") == (["iter_0000003"], "iter_0000003")


def test_fake_non_finite_steps_stop_after_max_skipped_steps(tmp_path, monkeypatch):
    """Skipped steps are logged, an applied one resets the count, and the run stops at the
    max_skipped_steps-th skip in a row; an interval save inside a run of skips is not written."""
    t = _trainer(tmp_path, ["train.iters=20", "train.max_skipped_steps=2", "checkpoint.interval=4"])
    pattern = {2: "nan", 4: "norm", 5: "norm"}  # 0-based steps; steps 3, 5 and 6 are skipped

    def fake_step(step):
        kind = pattern.get(step)
        return StepResult(loss=float("nan") if kind == "nan" else 5.0,
                          grad_norm=float("inf") if kind == "norm" else 1.0, tokens=10, skipped=kind is not None)

    monkeypatch.setattr(t, "train_step", fake_step)
    with pytest.raises(TrainingError, match=r"2 steps in a row were skipped \(steps 5-6.*max_skipped_steps=2"):
        t.run()
    records = _metrics(tmp_path / "log")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skip_reason") for r in records] == [None, None, "non-finite loss (nan)", None,
                                                        "non-finite grad norm (inf)", "non-finite grad norm (inf)"]
    assert _checkpoints(tmp_path / "ckpt") == (["iter_0000004"], "iter_0000004")


# ----------------------------------------------------------------------------------------- the parts
def test_spike_threshold_uses_the_window_known_one_step_late():
    g = DivergenceGuard(max_skipped=3, spike_factor=2.0, spike_window=2)
    for i, loss in enumerate([4.0, 3.0, 2.0]):
        assert g.observe(i, StepResult(loss=loss, grad_norm=1.0, tokens=1)) is None
    assert g.spike_threshold(2) is None          # only step 0 is <= 2 - 2
    assert g.spike_threshold(3) == 2.0 * 3.5     # steps 0, 1
    assert g.spike_threshold(4) == 2.0 * 2.5     # steps 1, 2
    assert DivergenceGuard(3).spike_threshold(10) is None  # the check is off
    skip, spike = DivergenceGuard.veto(torch.tensor(6.0, dtype=torch.float64), 5.0)
    assert (skip.item(), spike.item()) == (1.0, True)
    skip, spike = DivergenceGuard.veto(torch.tensor(float("nan")), 5.0)
    assert (skip.item(), spike.item()) == (1.0, False)
    skip, spike = DivergenceGuard.veto(torch.tensor(4.0), None)
    assert skip.item() == 0.0 and spike is None


def test_fp16_overflow_counts_only_at_the_smallest_loss_scale():
    g = DivergenceGuard(max_skipped=1, min_loss_scale=1.0)
    overflow = StepResult(loss=5.0, grad_norm=float("nan"), tokens=1, skipped=True, loss_scale=1024.0)
    assert g.observe(0, overflow).startswith("fp16 gradient overflow")
    g.check(1e-3, None)  # not counted: the scale can still back off
    at_floor = StepResult(loss=5.0, grad_norm=float("nan"), tokens=1, skipped=True, loss_scale=1.0)
    g.observe(1, at_floor)
    with pytest.raises(TrainingError, match="1 steps in a row"):
        g.check(1e-3, None)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_optimizer_skip_veto_leaves_masters_and_step_count(fused):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = MixedPrecisionOptimizer(model, lr=1e-2, clip_grad=1.0, fused=fused)
    for veto in (1.0, 0.0):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        before = [f.master.clone() for f in opt.fragments]
        info = opt.step(skip=torch.tensor(veto))
        assert info.skipped == bool(veto) and math.isfinite(info.grad_norm)
        same = all(torch.equal(f.master, b) for f, b in zip(opt.fragments, before))
        assert same == bool(veto)
    assert opt.num_steps == 1


@pytest.mark.gpu
def test_spike_check_queues_a_step_without_syncing_on_cuda(tmp_path):
    """With the loss-spike check armed (a full window), a whole ``train_step`` (bf16, one GPU, fused
    AdamW) is still queued under sync debug mode "error"; the veto is read with the step."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t = _trainer(tmp_path, ["train.iters=4", "precision.dtype=bf16", "device=cuda", "checkpoint.interval=0",
                            "train.loss_spike_factor=1.0001", "train.loss_spike_window=1"])
    t.setup()
    try:
        assert t.optimizer.fused
        for i in range(2):
            t.guard.observe(i, t.train_step(i).resolve())
        assert t.guard.spike_threshold(2) is not None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = t.train_step(2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = pending.resolve()
        assert result.loss_spike == (result.loss > pending.spike_threshold) and result.skipped == result.loss_spike
    finally:
        t.metrics.close()
