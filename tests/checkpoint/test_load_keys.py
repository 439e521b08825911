"""``checkpoint.load`` as Megatron-LM users expect it: unset or ``latest`` resumes the latest
checkpoint in ``checkpoint.dir`` (nothing there yet: step 0); a path loads that checkpoint (an
``iter_*`` directory, or a checkpoint directory meaning its latest); a path with nothing to load
is an error. The reference for every load: the weights saved at that step."""

import os
import shutil

import pytest
import torch

from megacore.checkpoint import CheckpointError, CheckpointManager, save_checkpoint
from megacore.config import CheckpointConfig, ConfigError
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``ckpt/`` with the checkpoints of steps 2 and 4 (different weights), and the weights of each."""
    root = tmp_path_factory.mktemp("load") / "ckpt"
    model = GPTModel(tiny_config(num_layers=1), seed=0)
    weights = {}
    for step in (2, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        save_checkpoint(str(root), step, model, extra={"consumed_samples": step})
        weights[step] = [p.detach().clone() for p in model.parameters()]
    return root, weights


def _resume(tmp_path, logs=None, **cfg):
    model = GPTModel(tiny_config(num_layers=1), seed=1)
    manager = CheckpointManager(CheckpointConfig(**cfg).validate(), log=(logs if logs is not None else []).append)
    try:
        result = manager.resume(model)
    finally:
        manager.close()
    return result, [p.detach() for p in model.parameters()]


def _loaded(result, params, weights, step):
    assert result is not None and result.step == step
    assert all(torch.equal(a, b) for a, b in zip(params, weights[step]))


def test_latest_and_unset_resume_the_latest_in_dir(saved, tmp_path):
    root, weights = saved
    for load in ("latest", None):
        result, params = _resume(tmp_path, dir=str(root), load=load)
        _loaded(result, params, weights, 4)
    # Megatron's habit: --load and --save the same directory (another spelling of it here).
    result, params = _resume(tmp_path, dir=str(root), load=str(root) + os.sep)
    _loaded(result, params, weights, 4)


def test_a_path_loads_that_checkpoint(saved, tmp_path):
    root, weights = saved
    result, params = _resume(tmp_path, load=str(root / "iter_0000002"))
    _loaded(result, params, weights, 2)
    result, params = _resume(tmp_path, load=str(root))  # a checkpoint directory: its latest
    _loaded(result, params, weights, 4)
    # A run that fine-tunes from another run's checkpoint and saves into its own, empty directory.
    result, params = _resume(tmp_path, load=str(root / "iter_0000002"), dir=str(tmp_path / "mine"))
    _loaded(result, params, weights, 2)
    result, params = _resume(tmp_path, load="2", dir=str(root))  # a step of checkpoint.dir
    _loaded(result, params, weights, 2)
    # An explicit path wins over checkpoint.dir's own checkpoints, and the log says how to continue those.
    shutil.copytree(root, tmp_path / "copy")
    logs = []
    result, params = _resume(tmp_path, logs, load=str(tmp_path / "copy" / "iter_0000002"), dir=str(root))
    _loaded(result, params, weights, 2)
    assert any("holds checkpoints up to step 4" in m and "checkpoint.load=latest" in m for m in logs), logs


def test_nothing_to_load(saved, tmp_path):
    root, _ = saved
    logs = []
    result, _ = _resume(tmp_path, logs, load="latest", dir=str(tmp_path / "fresh"))
    assert result is None and any("no checkpoint in" in m and "starting from step 0" in m for m in logs)
    with pytest.raises(ConfigError, match="checkpoint.load.*checkpoint.dir"):
        CheckpointConfig(load="latest").validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        _resume(tmp_path, load=str(tmp_path / "empty"), dir=str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match="does not exist"):
        _resume(tmp_path, load=str(tmp_path / "absent"))


def test_megacore_train_with_load_latest(tmp_path):
    """Through the command: the first launch with ``checkpoint.load=latest`` starts fresh, the same
    command with more iterations resumes from the checkpoint it wrote."""
    from tests.training.test_train_cli import SMALL, _env, read_metrics, run_cli

    ckpt = tmp_path / "ckpt"
    base = ["train", "configs/tiny_cpu.yaml", *SMALL, "data.source=mock", "model.vocab_size=128",
            f"checkpoint.dir={ckpt}", "checkpoint.load=latest"]
    env = _env(str(tmp_path / "cache"))
    first = run_cli([*base, "train.iters=2", f"log.dir={tmp_path / 'a'}"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting from step 0" in first.stdout + first.stderr
    second = run_cli([*base, "train.iters=3", f"log.dir={tmp_path / 'b'}"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {ckpt / 'iter_0000002'} at step 2" in second.stdout + second.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r] == [3]
