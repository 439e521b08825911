"""A checkpoint directory never loses data silently: a missing or unreadable ``latest`` falls back to
the newest complete checkpoint, one run at a time holds the directory's lock, pruning keeps the
newest intact data, and every file a load reads (rank json included) is verified before any state
changes, on every rank."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from megacore.checkpoint import (CheckpointError, CheckpointManager, DirectoryInUse, DirectoryLock, list_checkpoints,
                                 load_checkpoint, prune, resolve_load_path, save_checkpoint)
from megacore.config import CheckpointConfig
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(seed=0):
    model = GPTModel(tiny_config(num_layers=1), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    return model, opt


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save_steps(root, steps, model, opt):
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))  # each checkpoint's weights say which step it is
        save_checkpoint(str(root), step, model, opt)


# ------------------------------------------------------------------------------------ latest

@pytest.mark.parametrize("damage", ["deleted", "garbage", "directory"])
def test_missing_or_unreadable_latest_falls_back_to_newest_complete(tmp_path, damage):
    model, opt = _model()
    _save_steps(tmp_path, [5, 10], model, opt)
    (tmp_path / "iter_0000015.tmp").mkdir()  # a save that died: not complete, must not be chosen
    latest = tmp_path / "latest"
    latest.unlink()
    if damage == "garbage":
        latest.write_bytes(b"\xff\xfe not a name")
    elif damage == "directory":
        latest.mkdir()
    notes = []
    assert resolve_load_path(str(tmp_path), "latest", log=notes.append) == str(tmp_path / "iter_0000010")
    assert len(notes) == 1 and "iter_0000010" in notes[0] and "newest complete" in notes[0]

    # The training path: the manager resumes at step 10 with step 10's weights and says why.
    logs = []
    fresh, fresh_opt = _model(seed=3)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), log=logs.append)
    result = manager.resume(fresh, fresh_opt)
    manager.close()
    assert result.step == 10
    assert all(torch.all(p == 10.0) for p in fresh.parameters())
    assert any("newest complete checkpoint iter_0000010" in m for m in logs), logs
    assert not any("starting from step 0" in m for m in logs)
    # The library path warns instead of logging.
    with pytest.warns(UserWarning, match="iter_0000010"):
        assert load_checkpoint(str(tmp_path), fresh, fresh_opt).step == 10


def test_no_complete_checkpoint_is_a_fresh_start(tmp_path):
    (tmp_path / "iter_0000003.tmp").mkdir()
    assert resolve_load_path(str(tmp_path), "latest") is None
    assert resolve_load_path(str(tmp_path / "absent"), "latest") is None


# ------------------------------------------------------------------------------------ lock

def _hold_lock(root):
    """A separate process holding ``root``'s lock; returns it once the lock file names it."""
    code = ("import sys, time\nfrom megacore.checkpoint.lock import DirectoryLock\n"
            "DirectoryLock(sys.argv[1]).acquire()\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads((root / "lock").read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate(timeout=10)[1]
        time.sleep(0.05)
    _kill(proc)
    pytest.fail("the helper process never took the lock")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_second_holder_is_refused_naming_the_first_and_a_dead_holder_does_not_block(tmp_path):
    root = tmp_path / "ckpt"
    model, opt = _model()
    holder = _hold_lock(root)
    try:
        with pytest.raises(DirectoryInUse) as info:
            DirectoryLock(str(root)).acquire()
        assert f"pid {holder.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        # Writing into it without the lock is refused too (e.g. `megacore convert --force`), and so is a run.
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {holder.pid}"):
            save_checkpoint(str(root), 1, model, opt)
        with pytest.raises(DirectoryInUse, match=f"pid {holder.pid}"):
            CheckpointManager(CheckpointConfig(dir=str(root))).resume(model, opt)
        assert not any(n.startswith("iter_") for n in os.listdir(root))
    finally:
        _kill(holder)
    # The holder died without releasing: the kernel dropped its flock; the stale file does not block.
    assert (root / "lock").exists()
    manager = CheckpointManager(CheckpointConfig(dir=str(root)))
    assert manager.resume(model, opt) is None
    assert json.loads((root / "lock").read_text())["pid"] == os.getpid()
    second = CheckpointManager(CheckpointConfig(dir=str(root)))  # the same process may open it twice
    second.save(1, model, opt)
    second.close()
    manager.finish(2, model, opt)  # saves step 2 and releases the lock
    assert [s for s, _ in list_checkpoints(str(root))] == [1, 2]
    _kill(_hold_lock(root))  # released: another process takes it at once


# ------------------------------------------------------------------------------------ prune

def test_prune_never_removes_the_newest_intact_data(tmp_path):
    model, opt = _model()
    _save_steps(tmp_path, [1, 2, 3], model, opt)
    # A crash after step 4 was marked COMPLETE but before its rename: the only copy of step 4.
    shutil.copytree(tmp_path / "iter_0000003", tmp_path / "iter_0000004.tmp")
    # A crash while re-saving step 6 (between moving it aside and the rename): the only copy of step 6.
    shutil.copytree(tmp_path / "iter_0000003", tmp_path / "iter_0000006.old")
    # Leftovers that are not the newest intact data: an unfinished save, and an old copy of a step that exists.
    (tmp_path / "iter_0000005.tmp").mkdir()
    shutil.copytree(tmp_path / "iter_0000002", tmp_path / "iter_0000002.old")
    (tmp_path / "latest").write_text("garbage\n")  # an unreadable latest must not stop pruning
    removed = sorted(os.path.basename(p) for p in prune(str(tmp_path), keep_last=2))
    assert removed == ["iter_0000001", "iter_0000002.old", "iter_0000005.tmp"]
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("iter_"))
    assert left == ["iter_0000002", "iter_0000003", "iter_0000004.tmp", "iter_0000006.old"]
    # A newer committed checkpoint makes those leftovers stale: the next prune removes them.
    _save_steps(tmp_path, [7], model, opt)
    prune(str(tmp_path), keep_last=2)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("iter_")) == ["iter_0000003", "iter_0000007"]


# ------------------------------------------------------------------------------------ verified reads

def _rng_states():
    return random.getstate(), torch.get_rng_state().clone()


def _assert_rng(states):
    assert random.getstate() == states[0]
    assert torch.equal(torch.get_rng_state(), states[1])


def _perturb_rng_json(path):
    """Change one word of the saved Python RNG state, keeping the file valid JSON."""
    meta = json.loads(path.read_text())
    state = meta["rng"]["python"]["__tuple__"][1]["__tuple__"]
    state[7] = (state[7] + 1) % 2**32
    path.write_text(json.dumps(meta, indent=1))


def test_corrupted_rank_rng_json_is_detected_before_any_state_changes(tmp_path):
    model, opt = _model()
    save_checkpoint(str(tmp_path), 1, model, opt)
    _perturb_rng_json(tmp_path / "iter_0000001" / "rank_00000.json")
    target, target_opt = _model(seed=4)
    params = _params(target)
    random.seed(99)
    torch.manual_seed(99)
    before = _rng_states()
    with pytest.raises(CheckpointError, match=r"rank_00000\.json is corrupted"):
        load_checkpoint(str(tmp_path), target, target_opt)
    _assert_rng(before)
    assert all(torch.equal(p, params[n]) for n, p in target.named_parameters())
    assert not target_opt.state or all(torch.equal(s["step"], torch.tensor(1.0)) for s in target_opt.state.values())
    # Without RNG restoring the file is not read, so the rest of the checkpoint still loads.
    assert load_checkpoint(str(tmp_path), target, target_opt, load_rng=False).step == 1


def test_edited_index_is_detected_against_complete(tmp_path):
    model, opt = _model()
    save_checkpoint(str(tmp_path), 1, model, opt)
    index = tmp_path / "iter_0000001" / "index.json"
    text = index.read_text()
    assert '"step": 1,' in text
    index.write_text(text.replace('"step": 1,', '"step": 9,'))
    target, _ = _model(seed=4)
    params = _params(target)
    with pytest.raises(CheckpointError, match=r"index\.json is (corrupted|truncated)"):
        load_checkpoint(str(tmp_path), target)
    assert all(torch.equal(p, params[n]) for n, p in target.named_parameters())


def _two_rank_corrupt_json(rank, world_size, root):
    import torch.distributed as dist

    model, opt = _model()
    save_checkpoint(root, 1, model, opt)
    dist.barrier()
    if rank == 0:
        from pathlib import Path

        _perturb_rng_json(Path(root) / "iter_0000001" / "rank_00001.json")
    dist.barrier()
    random.seed(7 + rank)
    torch.manual_seed(7 + rank)
    before = _rng_states()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    params = _params(model)
    try:
        load_checkpoint(root, model, opt)
        return "loaded"
    except CheckpointError as e:
        unchanged = random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
        same = all(torch.equal(p, params[n]) for n, p in model.named_parameters())
        return str(e), unchanged, same


def test_corrupted_rank_json_of_one_rank_fails_every_rank_before_any_change(tmp_path):
    from tests.dist.harness import run_distributed

    results = run_distributed(_two_rank_corrupt_json, world_size=2, args=(str(tmp_path),), timeout_s=60)
    for rank, result in enumerate(results):
        assert result != "loaded", rank
        message, rng_unchanged, params_unchanged = result
        assert "rank_00001.json is corrupted" in message and "(rank 1)" in message, message
        assert rng_unchanged and params_unchanged, rank
