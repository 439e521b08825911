"""``megacore train`` loses nothing and hides nothing (issue 17), end to end through the CLI:

* a checkpoint directory whose ``latest`` was deleted resumes from the newest complete checkpoint;
* a second run on a ``checkpoint.dir`` in use refuses, naming the first run's host and pid;
* ``--nproc``: SIGKILL of the launcher leaves no worker; SIGTERM gives a slow final save the time
  it needs and exits 0 (and says so when the grace was too short); a stalled (SIGSTOPped) rank ends
  the job within ``parallel.timeout_s``, naming the rank and step.

Every process is bounded: the runs are tiny, each wait has a deadline, and ``finally`` kills what
is left (SIGCONT first, so a stopped worker dies too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.training.test_train_cli import ROOT, _env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")

TINY = ["configs/tiny_cpu.yaml", "data.source=mock", "model.vocab_size=256", "model.num_layers=2",
        "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=128",
        "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
        "log.interval=1"]


class Run:
    """``python -m megacore train TINY <args>`` in the background, output to files."""

    def __init__(self, tmp_path, name: str, args: list[str], env_extra: dict | None = None):
        self.log_dir = str(tmp_path / name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.out_path, self.err_path = os.path.join(self.log_dir, "stdout"), os.path.join(self.log_dir, "stderr")
        env = dict(_env(str(tmp_path / "cache")), **(env_extra or {}))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "megacore", "train", *TINY, f"log.dir={self.log_dir}",
                                          *args], cwd=ROOT, env=env, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def steps(self) -> list[int]:
        path = os.path.join(self.log_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]

    def wait_for_steps(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while len(self.steps()) < n:
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.stdout}\n{self.stderr}"
            assert time.time() < deadline, f"no {n} steps after {timeout}s:\n{self.stdout}\n{self.stderr}"
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def workers(self) -> dict[int, int]:
        """rank -> pid of the processes this run's launcher started (from their environment)."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if env.get(b"MEGACORE_LAUNCHER_PID") == str(self.proc.pid).encode():
                found[int(env[b"RANK"])] = int(entry)
        return found

    def kill_all(self) -> None:
        for pid in [*self.workers().values(), self.proc.pid]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _latest(ckpt) -> str | None:
    path = os.path.join(str(ckpt), "latest")
    return open(path).read().strip() if os.path.exists(path) else None


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = Run(tmp_path, "first", [f"checkpoint.dir={ckpt}", "checkpoint.interval=5", "train.iters=10"])
    assert first.wait(timeout=180) == 0, first.stderr
    (ckpt / "latest").unlink()  # iter_0000005 and iter_0000010 stay complete
    second = Run(tmp_path, "second", [f"checkpoint.dir={ckpt}", "checkpoint.interval=5", "train.iters=12"])
    assert second.wait(timeout=180) == 0, second.stderr
    assert "no 'latest' file; resuming from the newest complete checkpoint iter_0000010" in second.stdout
    assert "starting from step 0" not in second.stdout
    assert second.steps() == [11, 12]  # not 1..12 over the old checkpoints
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == \
        ["iter_0000005", "iter_0000010", "iter_0000012"]
    assert _latest(ckpt) == "iter_0000012"


def test_a_second_run_on_a_checkpoint_dir_in_use_refuses(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = Run(tmp_path, "first", [f"checkpoint.dir={ckpt}", "train.iters=100000"])
    try:
        first.wait_for_steps(1)
        second = Run(tmp_path, "second", [f"checkpoint.dir={ckpt}", "train.iters=3"])
        assert second.wait(timeout=180) == 2
        err = second.stderr
        assert f"pid {first.proc.pid} on host {socket.gethostname()}" in err and "in use by another run" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert second.steps() == []
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, first.stderr
    finally:
        first.kill_all()
    assert _latest(ckpt) == f"iter_{first.steps()[-1]:07d}"  # the first run's final save, untouched


def test_killing_the_launcher_leaves_no_worker(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = Run(tmp_path, "run", [f"checkpoint.dir={ckpt}", "train.iters=100000", "--nproc", "2"])
    try:
        run.wait_for_steps(2)
        workers = run.workers()
        assert sorted(workers) == [0, 1], workers
        run.proc.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        deadline = time.time() + 90
        while not all(_gone(pid) for pid in workers.values()):
            assert time.time() < deadline, f"workers still running 90 s after the launcher died: {workers}"
            time.sleep(0.2)
    finally:
        run.kill_all()
    # They stopped as on SIGTERM: the final step was saved, not lost.
    assert _latest(ckpt) == f"iter_{run.steps()[-1]:07d}", run.stdout


def test_sigterm_gives_the_final_save_its_time_and_exits_zero(tmp_path):
    slow = {"MEGACORE_TEST_SLOW_CHECKPOINT_WRITE_S": "6"}  # every rank's writer sleeps 6 s first
    ckpt = tmp_path / "ckpt"
    run = Run(tmp_path, "run", [f"checkpoint.dir={ckpt}", "train.iters=100000", "--nproc", "2"], slow)
    try:
        run.wait_for_steps(2)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 0, run.stderr
    finally:
        run.kill_all()
    assert _latest(ckpt) == f"iter_{run.steps()[-1]:07d}"
    assert "stopping cleanly" in run.stdout and "all 2 workers stopped cleanly after SIGTERM" in run.stderr
    assert "Traceback" not in run.stderr

    # The same stop with a grace shorter than the save: the save is lost, and the launcher says so.
    short = tmp_path / "short"
    run = Run(tmp_path, "short_run", [f"checkpoint.dir={short}", "train.iters=100000", "--nproc", "2",
                                      "--stop-grace-s", "1"], slow)
    try:
        run.wait_for_steps(2)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 1
    finally:
        run.kill_all()
    assert "final checkpoint save did not finish" in run.stderr and "--stop-grace-s" in run.stderr, run.stderr
    assert _latest(short) is None


def test_a_stalled_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    run = Run(tmp_path, "run", ["parallel.timeout_s=10", "train.iters=100000", "--nproc", "2"])
    try:
        run.wait_for_steps(2)
        workers = run.workers()
        os.kill(workers[1], signal.SIGSTOP)
        code = run.wait(timeout=90)  # 10 s of timeout plus the teardown, far from a hang
        assert all(_gone(pid) for pid in workers.values())
    finally:
        run.kill_all()
    err = run.stderr
    assert code != 0
    assert "rank 0: collective timed out after 10 s at step " in err, err
    assert f"rank 1 (pid {workers[1]}) was killed: it was stopped (SIGSTOP)" in err, err
