"""``megacore train ... --nproc N``: start N local training processes and own their lifetime.

    megacore train CONFIG.yaml [key=value ...] --nproc 4 [--stop-grace-s 600]

Each worker runs ``python -m megacore.train ARGS`` with torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` of a free local
port, ``OMP_NUM_THREADS=1`` unless set) plus ``MEGACORE_LAUNCHER_PID``, in a process group of its
own, so a terminal's Ctrl-C reaches the launcher, which decides:

* **Stop** (SIGTERM or SIGINT to the launcher): every worker gets SIGTERM, finishes its step, saves
  the final checkpoint (``checkpoint.save_on_exit``) and exits 0. The launcher waits up to
  ``--stop-grace-s`` (default :data:`DEFAULT_STOP_GRACE_S`) for that; workers still running then are
  killed and the launcher says their final save could not finish. A second signal kills at once.
  A clean stop exits 0.
* **Failure** (a worker exits non-zero or dies by a signal): the others get :data:`FAIL_QUIET_S` to
  exit by themselves (most errors stop every rank), then SIGTERM and, :data:`FAIL_GRACE_S` after the
  failure, SIGKILL; a worker stopped by SIGSTOP cannot act on SIGTERM, so it is named as stalled and
  killed at once. The exit code is the first failed worker's (1 for a signal).
* **Launcher death** (even SIGKILL): each worker asked the kernel for SIGTERM when its parent dies
  (:func:`exit_with_launcher`: ``prctl(PR_SET_PDEATHSIG)`` on Linux, a watchdog thread elsewhere),
  so it stops cleanly, saving as above, instead of training on as an orphan.

A rank that stalls without exiting is found by the others: their collectives time out after
``parallel.timeout_s`` and they exit naming the step (``megacore.training.peers``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

LAUNCHER_ENV = "MEGACORE_LAUNCHER_PID"
DEFAULT_STOP_GRACE_S = 600.0   # a final save of a large model to a slow filesystem takes minutes
FAIL_QUIET_S = 3.0             # after a failure: time the others get to exit by themselves (a shared error)
FAIL_GRACE_S = 30.0            # ... and, after SIGTERM, to report theirs and exit before SIGKILL
POLL_S = 0.1


def _say(msg: str) -> None:
    print(f"[megacore launcher] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_state(pid: int) -> Optional[str]:
    """The one-letter state of ``pid`` from /proc (``T``: stopped, ``Z``: zombie); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    code: Optional[int] = None
    killed: str = ""          # why the launcher killed it, if it did

    def poll(self) -> Optional[int]:
        if self.code is None:
            self.code = self.proc.poll()
        return self.code

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self, why: str) -> None:
        if self.alive:
            self.killed = why
            self.signal(signal.SIGKILL)


class _Signals:
    """Counts SIGTERM/SIGINT received by the launcher (handled in the main loop, not in the handler)."""

    def __init__(self):
        self.count = 0
        self.name = ""
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.name = self.name or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def launch_local(nproc: int, args: list[str], stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> int:
    """Run ``megacore.train ARGS`` on ``nproc`` local processes; returns the job's exit code."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", **{LAUNCHER_ENV: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", "1")
    signals = _Signals()
    signals.install()
    workers: list[_Worker] = []
    try:
        for rank in range(nproc):
            proc = subprocess.Popen([sys.executable, "-m", "megacore.train", *args], start_new_session=True,
                                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
            workers.append(_Worker(rank, proc))
        return _supervise(workers, signals, stop_grace_s)
    finally:
        for w in workers:  # only reached early by an exception of the launcher itself
            w.kill("the launcher failed")
            w.proc.wait()
        signals.restore()


def _supervise(workers: list[_Worker], signals: _Signals, stop_grace_s: float) -> int:
    handled_signals = 0
    deadline: Optional[float] = None   # when the workers still running get killed
    term_at: Optional[float] = None    # after a failure: when the workers still running get SIGTERM
    first_failure: Optional[_Worker] = None
    while any(w.alive for w in workers):
        now = time.monotonic()
        if signals.count > handled_signals:
            if handled_signals == 0:
                _say(f"received {signals.name}: asking {sum(w.alive for w in workers)} worker(s) to stop; they "
                     f"finish the step and save (waiting up to {stop_grace_s:g} s, --stop-grace-s)")
                for w in workers:
                    if w.alive:
                        w.signal(signal.SIGTERM)
                deadline = now + stop_grace_s if deadline is None else min(deadline, now + stop_grace_s)
            else:
                _say(f"received {signals.name} again: killing the workers now")
                for w in workers:
                    w.kill("a second stop signal")
            handled_signals = signals.count
        if first_failure is None:
            failed = [w for w in workers if w.poll() not in (None, 0)]
            if failed:
                first_failure = failed[0]
                for w in workers:
                    if w.alive and _proc_state(w.proc.pid) in ("T", "t"):
                        w.kill("it was stopped (SIGSTOP) and stalled the job")
                term_at = now + FAIL_QUIET_S
                deadline = now + FAIL_GRACE_S if deadline is None else min(deadline, now + FAIL_GRACE_S)
        if term_at is not None and now >= term_at:
            for w in workers:
                if w.alive:
                    w.signal(signal.SIGTERM)
            term_at = None
        if deadline is not None and now >= deadline:
            why = (f"still running {stop_grace_s:g} s after {signals.name}" if first_failure is None
                   else f"still running {FAIL_GRACE_S:g} s after rank {first_failure.rank} failed")
            for w in workers:
                w.kill(why)
        time.sleep(POLL_S)
    return _report(workers, signals, first_failure)


def _report(workers: list[_Worker], signals: _Signals, first_failure: Optional[_Worker]) -> int:
    nproc = len(workers)
    killed = [w for w in workers if w.killed]
    for w in killed:
        _say(f"rank {w.rank} (pid {w.proc.pid}) was killed: {w.killed}")
    if killed and first_failure is None:  # killed while stopping: the stop grace ran out, or a second signal
        _say(f"error: {len(killed)} of {nproc} worker(s) were killed before they finished stopping, so the final "
             "checkpoint save did not finish: 'latest' in checkpoint.dir still names the previous checkpoint (an "
             "unfinished iter_*.tmp may be left there; the next save removes it). Give the workers more time with "
             "--stop-grace-s")
        return 1
    failed = [w for w in workers if w.code not in (0, None) and not w.killed]
    if first_failure is not None or failed:
        first = first_failure or failed[0]
        codes = ", ".join(f"rank {w.rank}: {_exit_text(w.code)}" for w in workers if w.code != 0)
        _say(f"error: training failed: rank {first.rank} ended first ({_exit_text(first.code)}); {codes}. The "
             f"first message above from a rank says why")
        return first.code if first.code > 0 else 1
    if signals.count:
        _say(f"all {nproc} workers stopped cleanly after {signals.name}")
    return 0


# ------------------------------------------------------------------------------------- worker side

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_with_launcher() -> None:
    """In a worker started by :func:`launch_local`: receive SIGTERM when the launcher dies (the
    trainer then stops cleanly, as on any SIGTERM). A no-op in processes the launcher did not start."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not launcher.isdigit():
        return
    parent = int(launcher)
    if _set_parent_death_signal(signal.SIGTERM):
        if os.getppid() != parent:  # it died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_watch_parent, args=(parent,), name="megacore-launcher-watch", daemon=True).start()
