"""Checkpoint directory layout, atomic commit, ``latest`` and retention.

::

    CKPT_DIR/
      latest                    "iter_0000123" - only ever names a COMPLETE checkpoint (os.replace)
      iter_0000123/             one committed checkpoint
        COMPLETE                written after every rank finished, before the rename
        index.json              global tensors, chunk locations, checksums, common state
        rank_00000.safetensors  the chunks rank 0 wrote (+ its RNG state tensors)
        rank_00000.json         rank 0's file checksum and RNG state
      iter_0000124.tmp/         a save in progress (or one that died); never loaded, cleaned later
      lock                      the advisory lock of the run writing here (megacore.checkpoint.lock)

A save writes under ``iter_N.tmp``; rank 0 writes ``COMPLETE`` once all ranks reported success,
renames the directory to ``iter_N`` and then replaces ``latest``. A crash at any point leaves either
the old ``latest`` (pointing to an intact checkpoint) or the new one (pointing to a complete one).
A ``latest`` that is missing or unreadable (deleted by hand, garbage) is not followed: resuming falls
back to the newest complete ``iter_N`` and says so, so a run never restarts from step 0 over
complete checkpoints. Pruning keeps the newest ``keep_last`` complete checkpoints, the one
``latest`` names, and a complete leftover of a step newer than all of them (a crash mid-commit).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Callable, Optional

from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.lock import check_not_in_use

LATEST = "latest"
COMPLETE = "COMPLETE"
INDEX = "index.json"
TMP_SUFFIX = ".tmp"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_name(step: int) -> str:
    return f"iter_{int(step):07d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def rank_meta(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, INDEX))


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def read_latest(root: str) -> Optional[str]:
    """The iteration directory name ``latest`` names, or None when there is no ``latest``."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{path} holds {name!r}, not an iter_NNNNNNN name; it was not written by megacore - "
                              "delete it or point checkpoint.load at an iter_* directory")
    return name


def _latest_or_problem(root: str) -> tuple[Optional[str], Optional[str]]:
    """(the name ``latest`` holds, None), or (None, why it cannot be followed)."""
    path = os.path.join(root, LATEST)
    if not os.path.lexists(path):
        return None, "has no 'latest' file"
    try:
        name = read_latest(root)
    except (CheckpointError, OSError, UnicodeDecodeError) as e:
        return None, f"has an unreadable 'latest' file ({type(e).__name__}: {e})"
    if name is None:
        return None, "has a 'latest' that is not a file"
    return name, None


def _note(log: Optional[Callable[[str], None]], msg: str) -> None:
    if log is not None:
        log(msg)
    else:
        warnings.warn(msg, stacklevel=3)


def checkpoint_entries(root: str) -> list[str]:
    """Names in ``root`` that belong to training checkpoints (``latest``, ``iter_*`` complete or not)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n == LATEST or n.startswith("iter_"))


def write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def resolve_load_path(directory: str, which: "str | int | None" = "latest",
                      log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The complete iteration directory to load, or None when ``directory`` holds no checkpoint yet.

    ``which``: ``"latest"`` (or None) follows ``directory/latest``; an int or ``"iter_0000123"`` names a
    step under ``directory``; any other string is a path (an ``iter_*`` directory, or a checkpoint
    root whose ``latest`` is followed). Raises CheckpointError for an incomplete or missing target,
    and for a named root that holds no complete checkpoint (only ``"latest"`` may find nothing).
    A ``latest`` that is missing or unreadable falls back to the newest complete checkpoint, with a
    message through ``log`` (a warning when None); None only when no complete checkpoint exists.
    """
    if which is None or which == LATEST:
        if directory is None:
            raise CheckpointError("no checkpoint directory given; set checkpoint.load=PATH (or checkpoint.dir)")
        if is_complete(directory):
            return directory
        base = os.path.basename(os.path.normpath(directory))
        if _ITER_RE.match(base) or (base.startswith("iter_") and base.endswith(TMP_SUFFIX)):
            return resolve_load_path(None, directory)  # an iteration directory: say what is wrong with it
        name, problem = _latest_or_problem(directory)
        if name is None:
            complete = list_checkpoints(directory)
            if not complete:
                return None
            newest = complete[-1][1]
            _note(log, f"checkpoint directory {directory} {problem}; resuming from the newest complete checkpoint "
                       f"{os.path.basename(newest)} instead (of {len(complete)} complete)")
            return newest
        target = os.path.join(directory, name)
        if not is_complete(target):
            raise CheckpointError(f"{os.path.join(directory, LATEST)} names {name}, which is missing or has no COMPLETE "
                                  f"marker; load an earlier checkpoint explicitly (complete ones: "
                                  f"{[os.path.basename(p) for _, p in list_checkpoints(directory)] or 'none'})")
        return target
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        which = iter_name(int(which))
    path = which if os.path.isabs(which) or directory is None or os.path.exists(which) else os.path.join(directory, which)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass a directory written by megacore.checkpoint")
    if not os.path.basename(os.path.normpath(path)).startswith("iter_") and not os.path.isfile(os.path.join(path, COMPLETE)):
        # A checkpoint root (a run's checkpoint.dir): its latest, or the newest complete one.
        found = resolve_load_path(path, LATEST, log)
        if found is None:
            raise CheckpointError(f"checkpoint {path} holds no complete checkpoint (no iter_* directory with a COMPLETE "
                                  "marker); point it at an iter_* directory or a checkpoint.dir written by megacore")
        return found
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        root = os.path.dirname(os.path.normpath(path))
        complete = [os.path.basename(p) for _, p in list_checkpoints(root)]
        raise CheckpointError(f"checkpoint {path} has no COMPLETE marker: its save was interrupted or is still running, "
                              f"so it may be partial; load a complete one instead ({complete or 'none found'})")
    if not os.path.isfile(os.path.join(path, INDEX)):
        raise CheckpointError(f"checkpoint {path} has no {INDEX}; it is not a megacore checkpoint")
    return path


def prepare_tmp_dir(root: str, step: int) -> str:
    """Create a fresh ``iter_N.tmp`` (removing leftovers of a save that died). Rank 0 only.
    Refuses (``DirectoryInUse``) when another process holds the directory's lock."""
    os.makedirs(root, exist_ok=True)
    check_not_in_use(root)
    tmp = os.path.join(root, iter_name(step) + TMP_SUFFIX)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, root: str, step: int, keep_last: Optional[int]) -> str:
    """Rename a finished ``tmp`` (COMPLETE already inside) to ``iter_N``, point ``latest`` at it, prune."""
    final = os.path.join(root, iter_name(step))
    if os.path.exists(final):  # re-saving a step: move the old one aside first, never delete before the rename
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    write_latest(root, iter_name(step))
    if keep_last is not None:
        prune(root, keep_last)
    return final


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)
    and leftovers of dead saves; returns what was removed.

    A leftover (``iter_N.tmp`` or ``iter_N.old``) that is itself complete and holds a step newer than
    every complete ``iter_*`` (a crash between marking a save COMPLETE and its rename, or in the
    middle of re-saving a step) is the newest intact data, so it stays until a newer step commits.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last} must be >= 1; keep at least one checkpoint")
    latest, _ = _latest_or_problem(root)
    removed = []
    complete = list_checkpoints(root)
    for _, path in complete[:-keep_last] if len(complete) > keep_last else []:
        if os.path.basename(path) != latest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    newest = complete[-1][0] if complete else -1
    for name in os.listdir(root):
        if not (name.startswith("iter_") and (name.endswith(TMP_SUFFIX) or name.endswith(".old"))):
            continue
        path = os.path.join(root, name)
        m = _ITER_RE.match(name.rsplit(".", 1)[0])
        if m and int(m.group(1)) > newest and is_complete(path):
            continue  # the newest intact data: keep it
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
