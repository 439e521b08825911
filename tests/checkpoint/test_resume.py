"""A run resumed from a checkpoint at step k reproduces the uninterrupted run exactly (fp32): same
losses, same final weights. Dropout is on, so the RNG state must be restored too, and the save is
async, so training continues while the checkpoint is written."""

import torch

from megacore.checkpoint import load_checkpoint, resolve_load_path, save_checkpoint, wait_for_pending
from megacore.config import TrainConfig
from megacore.models.gpt import GPTModel
from megacore.training.lr_schedule import LRSchedule
from megacore.optim.optimizer import weight_decay_groups
from tests.checkpoint.layouts import tiny_config

STEPS, SAVE_AT, SEED = 6, 3, 11


def _batch(step: int, cfg):
    """Samples are addressed by global index: the batch of a step depends on the step only."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _setup(seed):
    cfg = tiny_config(num_layers=2, hidden_dropout=0.1, attention_dropout=0.1)
    model = GPTModel(cfg, seed=seed).train()
    train = TrainConfig(iters=STEPS, lr=3e-3, min_lr=3e-4, warmup_iters=2, weight_decay=0.1)
    opt = torch.optim.AdamW(weight_decay_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.95))
    return model, opt, LRSchedule(train)


def _run(model, opt, schedule, start, stop, ckpt_dir=None):
    losses = []
    for step in range(start, stop):
        tokens, labels = _batch(step, model.config)
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        schedule.apply(opt, step)
        opt.step()
        losses.append(loss.item())
        if ckpt_dir is not None and step + 1 == SAVE_AT:
            save_checkpoint(ckpt_dir, step + 1, model, opt, scheduler_state={"step": step + 1},
                            extra={"consumed_samples": (step + 1) * 2}, async_save=True)
    return losses


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    torch.manual_seed(SEED)
    model, opt, schedule = _setup(SEED)
    full_losses = _run(model, opt, schedule, 0, STEPS, str(tmp_path))
    wait_for_pending()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(999)  # a different RNG history: the checkpoint must restore it
    model2, opt2, schedule2 = _setup(seed=SEED + 1)
    result = load_checkpoint(resolve_load_path(str(tmp_path)), model2, opt2)
    assert result.step == SAVE_AT and result.rng_restored
    assert result.extra["consumed_samples"] == SAVE_AT * 2
    resumed = _run(model2, opt2, schedule2, result.step, STEPS)
    assert resumed == full_losses[SAVE_AT:]
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), final[n]), n


def test_manager_saves_on_interval_and_exit_and_resumes(tmp_path):
    from megacore.checkpoint import CheckpointManager, list_checkpoints
    from megacore.config import CheckpointConfig

    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), interval=2, async_save=True, keep_last=2).validate()
    logs = []
    manager = CheckpointManager(cfg, log=logs.append)
    model, opt, schedule = _setup(SEED)
    assert manager.resume(model, opt) is None
    step = 0
    while step < 5:
        _run(model, opt, schedule, step, step + 1)
        step += 1
        if manager.should_save(step):
            manager.save(step, model, opt, extra={"consumed_samples": step * 2})
        else:
            manager.poll()
    manager.finish(step, model, opt, extra={"consumed_samples": step * 2})
    assert [s for s, _ in list_checkpoints(cfg.dir)] == [4, 5]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000005"
    assert any("stalled" in m for m in logs)

    model2, opt2, _ = _setup(SEED + 1)
    result = CheckpointManager(cfg).resume(model2, opt2)
    assert result.step == 5 and result.extra == {"consumed_samples": 10}
    for (n, p), q in zip(model2.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n

    # A model-only checkpoint (as `megacore convert --from hf` writes) resumes weights, fresh optimizer.
    save_checkpoint(str(tmp_path / "weights"), 0, model)
    model3, opt3, _ = _setup(SEED + 2)
    CheckpointManager(type(cfg)(load=str(tmp_path / "weights"))).resume(model3, opt3)
    assert not opt3.state and all(torch.equal(p, q) for p, q in zip(model3.parameters(), model.parameters()))
