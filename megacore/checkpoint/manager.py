"""``CheckpointManager``: the few calls a training loop makes, driven by ``CheckpointConfig``.

    ckpt = CheckpointManager(cfg.checkpoint, log=print)
    resumed = ckpt.resume(model_chunks, optimizer, scaler)        # LoadResult or None
    step = resumed.step if resumed else 0                          # data position = step
    for ...:
        ...one optimizer step...; step += 1
        if ckpt.should_save(step):
            ckpt.save(step, model_chunks, optimizer, scaler, extra={"consumed_samples": step * G})
        else:
            ckpt.poll()                                            # commit a finished async save early
    ckpt.finish(step, model_chunks, optimizer, scaler, extra=...)  # save on exit (if configured) + wait

Every call is collective: make it on every rank at the same point of the loop.

The manager locks ``checkpoint.dir`` (:meth:`lock`, also taken by ``resume`` and ``save``): rank 0
holds ``megacore.checkpoint.lock.DirectoryLock`` until :meth:`finish` / :meth:`close` or its exit,
and every rank raises ``DirectoryInUse`` (naming the holder's host and pid) while another run holds
it. Resuming from a directory whose ``latest`` is missing or unreadable takes the newest complete
checkpoint and logs that it did (``resolve_load_path``).

With async saving configured (``checkpoint.dir``, ``interval > 0``, ``async_save``) and CUDA
available, ``resume()`` also allocates the pinned host buffers the saves copy into
(:meth:`prepare`), so that the first save, like every later one, stalls training only for the
device->host copy instead of also page-locking several GB of host memory.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megacore.checkpoint import comm
from megacore.checkpoint.directory import LATEST, list_checkpoints, resolve_load_path
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.load import LoadResult, load_checkpoint, read_index
from megacore.checkpoint.lock import DirectoryInUse, DirectoryLock
from megacore.checkpoint.save import (SaveHandle, poll_pending, prepare_snapshot_buffers, save_checkpoint,
                                      wait_for_pending)
from megacore.checkpoint.sharded import OPTIM_PREFIX
from megacore.config import CheckpointConfig


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    except (OSError, ValueError):
        return False


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, log: Callable[[str], None] = lambda msg: None):
        self.cfg = cfg
        self.log = log
        self.last_saved_step: Optional[int] = None
        self.last_handle: Optional[SaveHandle] = None
        self._lock: Optional[DirectoryLock] = None

    # ---------------------------------------------------------------------------- lock
    def lock(self) -> None:
        """Lock ``checkpoint.dir`` for this run (collective; a no-op without a dir or once locked).
        Raises ``DirectoryInUse`` on every rank when another process holds it."""
        if not self.cfg.dir or self._lock is not None:
            return
        error, lock = None, None
        if comm.rank() == 0:
            try:
                lock = DirectoryLock(self.cfg.dir).acquire()
            except DirectoryInUse as e:
                error = (True, str(e))
            except OSError as e:  # e.g. the directory cannot be created: every rank must hear of it
                error = (False, f"cannot lock checkpoint.dir {self.cfg.dir} ({type(e).__name__}: {e}); check "
                                "that the directory can be created and written")
        in_use, message = comm.all_gather_object(error)[0] or (None, None)
        if message is not None:
            raise (DirectoryInUse if in_use else CheckpointError)(message)
        self._lock = lock or DirectoryLock(self.cfg.dir)  # ranks > 0 hold nothing; the object marks "done"

    def close(self) -> None:
        """Release the lock (not collective). ``finish`` calls it; so does process exit."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---------------------------------------------------------------------------- resume
    def resume(self, model_chunks, optimizer=None, scaler=None, strict: bool = True) -> Optional[LoadResult]:
        """Load ``checkpoint.load`` (or, when unset or ``latest``, the latest checkpoint in
        ``checkpoint.dir``; :meth:`load_path`).

        Returns None when there is nothing to resume from. A model-only checkpoint (e.g. from
        ``megacore convert --from hf``) loads the weights and leaves the optimizer fresh.
        Then, when async saves are configured, reserves their snapshot buffers (:meth:`prepare`).
        """
        self.lock()
        result = self._load(model_chunks, optimizer, scaler, strict)
        if self.cfg.dir and self.cfg.interval > 0 and self.cfg.async_save and torch.cuda.is_available():
            self.prepare(model_chunks, optimizer)
        return result

    def prepare(self, model_chunks, optimizer=None) -> None:
        """Allocate the pinned host buffers the next save copies into (collective; a no-op on CPU)."""
        stats = prepare_snapshot_buffers(model_chunks, optimizer)
        if stats is not None and stats.alloc_bytes:
            self.log(f"checkpoint snapshot buffers: {stats.alloc_bytes / 2**30:.2f} GiB of "
                     f"{'pinned' if stats.pinned else 'pageable'} host memory in {stats.alloc_s:.2f}s")

    def load_path(self) -> Optional[str]:
        """The checkpoint a resume loads, or None to start from step 0 (see ``checkpoint.load``):

        - ``load`` unset or ``latest``: the latest complete checkpoint in ``checkpoint.dir``; None when
          it holds none yet (as Megatron-LM does: one command serves the first launch and every
          restart). ``latest`` without ``checkpoint.dir`` is an error.
        - ``load`` the same directory as ``checkpoint.dir`` (Megatron's ``--load`` = ``--save``): the same.
        - any other ``load``: that checkpoint: an ``iter_*`` directory, a checkpoint root (its latest),
          or an ``iter_*`` name / step number under ``checkpoint.dir``. It must exist and be complete.
        """
        load, root = self.cfg.load, self.cfg.dir
        if load is None or load == LATEST or (root and _same_dir(str(load), root)):
            if not root:
                if load == LATEST:
                    raise CheckpointError("checkpoint.load=latest resumes from checkpoint.dir, which is not set; set "
                                          "checkpoint.dir=PATH, or checkpoint.load=PATH of the checkpoint to load")
                return None
            path = resolve_load_path(root, LATEST, self.log)
            if path is None:
                self.log(f"no checkpoint in {root} yet: starting from step 0")
            return path
        path = resolve_load_path(root or None, os.path.expanduser(str(load)), self.log)
        own = list_checkpoints(root) if root else []
        if own and not _same_dir(os.path.dirname(os.path.normpath(path)), root):
            self.log(f"loading checkpoint.load={load} although checkpoint.dir={root} holds checkpoints up to step "
                     f"{own[-1][0]}; to continue from those instead, set checkpoint.load=latest")
        return path

    def _load(self, model_chunks, optimizer, scaler, strict: bool) -> Optional[LoadResult]:
        path = self.load_path()
        if path is None:
            return None
        index = read_index(path)
        has_optim = any(k.startswith(OPTIM_PREFIX) for k in index["tensors"])
        result = load_checkpoint(path, model_chunks, optimizer if has_optim else None, scaler, strict=strict)
        note = "" if has_optim or optimizer is None else " (model only: the checkpoint has no optimizer state)"
        rng = "" if result.rng_restored else f"; RNG not restored ({result.rng_note})"
        self.log(f"resumed from {path} at step {result.step}{note}{rng}")
        self.last_saved_step = result.step
        return result

    # ---------------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        return bool(self.cfg.dir) and self.cfg.interval > 0 and step % self.cfg.interval == 0

    def save(self, step: int, model_chunks, optimizer=None, scaler=None, extra: Optional[dict] = None,
             async_save: Optional[bool] = None) -> SaveHandle:
        self.lock()
        asynchronous = self.cfg.async_save if async_save is None else async_save
        handle = save_checkpoint(self.cfg.dir, step, model_chunks, optimizer, scheduler_state={"step": step},
                                 scaler=scaler, extra=extra, async_save=asynchronous, keep_last=self.cfg.keep_last)
        mode = "async, writing in the background" if asynchronous else f"written to {handle.path}"
        self.log(f"checkpoint of step {step}: training stalled {handle.stall_s:.3f}s ({mode})")
        self.last_saved_step, self.last_handle = step, handle
        return handle

    def poll(self) -> Optional[str]:
        """Commit a finished async save (collective, non-blocking); returns its path when committed."""
        path = poll_pending()
        if path is not None:
            self.log(f"checkpoint committed: {path}")
        return path

    def finish(self, step: int, model_chunks, optimizer=None, scaler=None, extra: Optional[dict] = None) -> None:
        """At the end of training (or on SIGTERM): save the final step if configured, then wait for
        every pending write and commit."""
        if self.cfg.dir and self.cfg.save_on_exit and step > 0 and self.last_saved_step != step:
            self.save(step, model_chunks, optimizer, scaler, extra, async_save=False)
        path = wait_for_pending()
        if path is not None:
            self.log(f"checkpoint committed: {path}")
        self.close()
