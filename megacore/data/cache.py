"""On-disk cache helpers: where the cache lives, content hashes, atomic writes, a build lock.

Everything the data pipeline builds once (trained tokenizers, the tokenized default corpus, GPT
sample indices) is stored under the cache directory, named by a hash of its inputs, so a second
run loads it instead of rebuilding. Writes go to a temporary file in the same directory followed
by ``os.replace`` (atomic on POSIX), so a reader never sees a half-written file; ``build_lock``
makes concurrent processes (e.g. the ranks of one job) build a given entry only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from megacore.file_modes import current_umask

ENV_CACHE = "MEGACORE_CACHE"


def default_cache_dir(configured: Optional[str] = None) -> Path:
    """``configured`` (data.cache_dir) if given, else ``$MEGACORE_CACHE``, else ``~/.cache/megacore``."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "megacore"


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex sha256 prefix over ``parts``: str/bytes/numpy arrays hashed by content, others via json."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            h.update(f"ndarray:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
        elif isinstance(part, bytes):
            h.update(b"bytes:" + len(part).to_bytes(8, "little") + part)
        elif isinstance(part, str):
            raw = part.encode("utf-8")
            h.update(b"str:" + len(raw).to_bytes(8, "little") + raw)
        else:
            raw = json.dumps(part, sort_keys=True, default=str).encode("utf-8")
            h.update(b"json:" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()[:length]


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create cache directory {str(path)!r} ({e.strerror}); set data.cache_dir "
                      f"or the {ENV_CACHE} environment variable to a writable folder") from e
    return path


def temp_path_for(final: Path) -> Path:
    """A unique temporary file next to ``final`` (same filesystem, so os.replace is atomic).

    ``mkstemp`` creates it 0600; it gets the mode a plain ``open`` would give (0666 under the
    umask, 0644 with the usual 022), so the file renamed into place is readable like any other
    output, e.g. by the other users of a shared data folder."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=str(final.parent))
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_npy(final: Path, array: np.ndarray) -> None:
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (a ``.lock`` file): the first process builds, the others
    wait and then find the finished entry. A no-op where ``fcntl`` is unavailable."""
    ensure_dir(path.parent)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes still keep the cache consistent
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
