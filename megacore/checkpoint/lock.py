"""An advisory lock on a checkpoint directory: one run writes to a ``checkpoint.dir`` at a time.

    lock = DirectoryLock(ckpt_dir).acquire()     # raises DirectoryInUse naming the holder's host and pid
    ...                                          # the run's lifetime
    lock.release()                               # or let the process exit

The lock is ``flock(LOCK_EX)`` on ``CKPT_DIR/lock``, a small JSON file naming the holder (host,
pid, start time, command). The kernel drops a flock when its holder dies, however it dies, so a
lock left behind by a dead run never blocks: the file stays, with stale contents, and the next run
takes it and rewrites them. A flock lives on the open file description, so this process checking
its own directory (``holder_elsewhere``) never disturbs the lock it holds; two locks on one
directory in one process share it (the file is unlocked when the last is released).

It is advisory: it keeps megacore runs (and ``megacore convert``) apart, not other programs. On
a filesystem without locks (some network filesystems) ``acquire`` warns and goes on unlocked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from typing import Optional

from megacore.checkpoint.errors import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: no flock, no lock
    fcntl = None

LOCK = "lock"

_HELD: dict[str, list] = {}  # realpath of a directory this process holds -> [fd, number of holders]


class DirectoryInUse(CheckpointError):
    """Another live process holds the directory's lock; the message names it."""


def _describe(path: str) -> str:
    """What the lock file says about its holder (best effort: the holder may be rewriting it)."""
    try:
        with open(path) as f:
            info = json.load(f)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _in_use(root: str, holder: str) -> DirectoryInUse:
    return DirectoryInUse(f"checkpoint directory {root} is in use by another run ({holder}); two runs writing one "
                          "directory overwrite each other's checkpoints. Stop that run first, or give this one "
                          "another checkpoint.dir")


class DirectoryLock:
    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LOCK)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        """Take the lock (creating the directory), or raise ``DirectoryInUse``. Idempotent."""
        if self._fd is not None or fcntl is None:
            return self
        key = os.path.realpath(self.root)
        if key in _HELD:  # this process holds it already (e.g. a second manager of the same run)
            _HELD[key][1] += 1
            self._fd = _HELD[key][0]
            return self
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(self.root, _describe(self.path)) from None
        except OSError as e:  # ENOLCK / EOPNOTSUPP: the filesystem has no locks
            os.close(fd)
            warnings.warn(f"could not lock checkpoint directory {self.root} ({e}); nothing keeps a second run "
                          "from writing to it", stacklevel=2)
            return self
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = [fd, 1]
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; its contents are stale from now on). Idempotent."""
        if self._fd is None:
            return
        self._fd = None
        key = os.path.realpath(self.root)
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            try:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            finally:
                os.close(entry[0])

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_elsewhere(root: str) -> Optional[str]:
    """Who holds ``root``'s lock when it is another process (or another lock object); None when it
    is free or held by this process."""
    if fcntl is None or os.path.realpath(root) in _HELD:
        return None
    path = os.path.join(root, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody ever locked it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    except OSError:  # no locks on this filesystem
        return None
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return None


def check_not_in_use(root: str) -> None:
    """Raise ``DirectoryInUse`` when another process holds ``root``'s lock (before writing to it)."""
    holder = holder_elsewhere(root)
    if holder is not None:
        raise _in_use(root, holder)
