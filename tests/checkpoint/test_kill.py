"""A rank SIGKILLed in the middle of an async save leaves the previous checkpoint loadable, ``latest``
untouched and no committed directory for the dead save; the next save succeeds and cleans up."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megacore.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_load_path, save_checkpoint
from tests.checkpoint.kill_worker import build
from tests.dist.harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wait_for(path, procs, timeout):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            return False
        time.sleep(0.05)
    return True


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.checkpoint.kill_worker", root], cwd=REPO,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        started = _wait_for(os.path.join(root, "writing_1"), procs, timeout=120)
        if not started:
            out = b"".join(p.communicate(timeout=30)[0] or b"" for p in procs)
            pytest.fail(f"workers never reached the async save:\n{out.decode(errors='replace')[-3000:]}")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        try:  # the survivor must fail its commit (peer gone), not hang or commit
            procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    status0 = (tmp_path / "ckpt" / "status_0").read_text() if (tmp_path / "ckpt" / "status_0").exists() else "killed"
    assert not status0.startswith("committed"), status0
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "ckpt" / "iter_0000002").exists()
    assert not (tmp_path / "ckpt" / "iter_0000002.tmp" / "COMPLETE").exists()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_load_path(root, str(tmp_path / "ckpt" / "iter_0000002.tmp"))

    # The previous checkpoint loads (in this single process: a different world size) and is intact.
    want_model, want_opt = build()
    model, opt = build(seed=5)
    assert load_checkpoint(root, model, opt).step == 1
    for (n, p), q in zip(model.named_parameters(), want_model.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(opt.state[p]["exp_avg"], want_opt.state[q]["exp_avg"]), n

    # Saving again works and removes the dead save's leftovers.
    save_checkpoint(root, 2, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [1, 2]
    assert not any(name.endswith(".tmp") for name in os.listdir(root))
