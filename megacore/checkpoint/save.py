"""Saving: describe -> plan -> snapshot (the only stall) -> write (background) -> commit (collective).

    handle = save_checkpoint(dir, step, model_chunks, optimizer, scheduler_state={"step": step},
                             scaler=scaler, extra={"consumed_samples": n}, async_save=True)
    ...                       # training continues while a thread writes the files
    handle.wait()             # before the next save and before exit (save_checkpoint waits itself)

The snapshot copies this rank's pieces into CPU memory (pinned and reused between saves on GPU);
``handle.stall_s`` measures it. The writer thread only writes files and hashes them. ``wait()``
joins it, checks every rank succeeded, and rank 0 writes ``index.json`` and ``COMPLETE``, renames
``iter_N.tmp`` to ``iter_N`` and replaces ``latest`` (see megacore.checkpoint.directory).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Optional

import torch

from megacore.checkpoint import comm
from megacore.checkpoint.boxes import slices
from megacore.checkpoint.directory import COMPLETE, INDEX, commit, iter_name, prepare_tmp_dir, rank_file, rank_meta
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.optim_state import describe_optimizer
from megacore.checkpoint.plan import SavePlan, chunk_name, make_plan, piece_meta
from megacore.checkpoint.rng import capture_rng, current_layout
from megacore.checkpoint.serialize import read_json, to_json_tree, write_json, write_safetensors
from megacore.checkpoint.sharded import ShardedPiece, as_chunks, describe_model, finish_param_sync

FORMAT = "megacore-checkpoint"
VERSION = 1

_pending: Optional["SaveHandle"] = None
_pinned_cache: dict[tuple, list[torch.Tensor]] = {}


class SaveHandle:
    """One save in flight (async) or done (sync). ``wait()`` is collective: call it on every rank."""

    def __init__(self, root: str, step: int, tmp: str, keep_last: Optional[int], group=None):
        self.root, self.step, self.tmp, self.keep_last, self.group = root, step, tmp, keep_last, group
        self.path: Optional[str] = None      # the committed iter_N directory, once done
        self.stall_s = 0.0                   # time training was blocked (describe + plan + snapshot)
        self.write_s = 0.0                   # time the writer spent (background when async)
        self.bytes_written = 0
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self._index: Optional[dict] = None
        self._finished = False

    def local_done(self) -> bool:
        """This rank's files are written (no collective; the commit still needs ``wait()``)."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> str:
        """Finish the save on every rank and commit it; returns the checkpoint path. Idempotent."""
        global _pending
        if self._finished:
            return self.path
        if self._thread is not None:
            self._thread.join()
        self._finished = True
        if _pending is self:
            _pending = None
        comm.raise_if_any(self._error, f"saving checkpoint {self.tmp}", self.group)
        error, path = None, None
        if comm.rank(self.group) == 0:
            try:
                path = self._commit()
            except Exception as e:  # reported to every rank below
                error = f"{type(e).__name__}: {e}"
        error, path = comm.broadcast_object((error, path), 0, self.group)
        if error:
            raise CheckpointError(f"committing checkpoint {self.tmp} failed: {error}; the previous checkpoint and "
                                  "'latest' are untouched")
        self.path = path
        return path

    def _commit(self) -> str:
        index = self._index
        files = {}
        for r in range(index["world_size"]):
            meta = read_json(os.path.join(self.tmp, rank_meta(r)), self.tmp)
            files[rank_file(r)] = meta["file"]
        index["files"] = files
        write_json(os.path.join(self.tmp, INDEX), index)
        write_json(os.path.join(self.tmp, COMPLETE), {"step": self.step, "time": time.time()})
        return commit(self.tmp, self.root, self.step, self.keep_last)


def wait_for_pending() -> Optional[str]:
    """Finish the async save in flight, if any (collective). Call before exit."""
    if _pending is not None:
        return _pending.wait()
    return None


def pending_save() -> Optional[SaveHandle]:
    return _pending


def poll_pending(group=None) -> Optional[str]:
    """Commit the async save in flight if every rank has finished writing; never blocks on I/O.

    Collective (one small all-gather): call it on every rank at the same point, e.g. every log
    interval, so ``latest`` advances soon after the files are on disk. Returns the committed path.
    """
    if _pending is None:
        return None
    flags = comm.all_gather_object(_pending.local_done(), group)
    return _pending.wait() if all(flags) else None


def _snapshot(pieces: list[ShardedPiece], async_save: bool) -> list[torch.Tensor]:
    """CPU copies of ``pieces``: pinned (reused across saves) for GPU tensors; clones on CPU when async."""
    on_gpu = any(p.tensor.is_cuda for p in pieces)
    if on_gpu:
        signature = tuple((p.shape, p.tensor.dtype) for p in pieces)
        bufs = _pinned_cache.get(signature)
        if bufs is None:
            _pinned_cache.clear()
            bufs = [torch.empty(s, dtype=d, pin_memory=True) for s, d in signature]
            _pinned_cache[signature] = bufs
        for buf, p in zip(bufs, pieces):
            buf.copy_(p.tensor, non_blocking=p.tensor.is_cuda)
        torch.cuda.synchronize()
        return bufs
    if async_save:
        return [p.tensor.clone(memory_format=torch.contiguous_format) for p in pieces]
    return [p.tensor.contiguous() for p in pieces]


def _sub_piece(p: ShardedPiece, offsets: tuple, shape: tuple) -> ShardedPiece:
    if tuple(offsets) == tuple(p.offsets) and tuple(shape) == p.shape:
        return p
    view = p.tensor[slices([a - b for a, b in zip(offsets, p.offsets)], shape)]
    return ShardedPiece(p.key, p.global_shape, tuple(offsets), view)


def _config_dict(chunks) -> Optional[dict]:
    config = getattr(chunks[0], "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return None


def _write_rank(handle: SaveHandle, rank: int, entries: list[tuple[str, torch.Tensor]], meta: dict) -> None:
    start = time.perf_counter()
    try:
        digest = write_safetensors(os.path.join(handle.tmp, rank_file(rank)), entries,
                                   {"format": FORMAT, "rank": str(rank)})
        meta["file"] = digest
        write_json(os.path.join(handle.tmp, rank_meta(rank)), meta)
        handle.bytes_written = digest["size"]
    except Exception as e:  # surfaced by wait() on every rank
        handle._error = f"{type(e).__name__}: {e}"
    handle.write_s = time.perf_counter() - start


def save_checkpoint(directory: str, step: int, model_chunks, optimizer=None, scheduler_state: Optional[dict] = None,
                    scaler=None, extra: Optional[dict] = None, async_save: bool = False,
                    keep_last: Optional[int] = None, group=None) -> SaveHandle:
    """Save a checkpoint of step ``step`` under ``directory/iter_{step:07d}`` (collective).

    ``model_chunks``: this rank's model (or list of virtual-pipeline chunks); ``optimizer``: a
    torch optimizer or a flat-sharded one (see optim_state); ``scheduler_state``/``extra``: JSON-like
    dicts (tensors allowed); ``scaler``: anything with ``state_dict()``. Returns a handle; with
    ``async_save`` the files are written in the background and the commit happens in
    ``handle.wait()`` (or the next ``save_checkpoint``); without it the checkpoint is committed on return.
    """
    wait_for_pending()
    global _pending
    t0 = time.perf_counter()
    rank, world = comm.rank(group), comm.world_size(group)
    tmp = os.path.join(directory, iter_name(step) + ".tmp")
    handle = SaveHandle(directory, step, tmp, keep_last, group)
    error, metas, pieces, common_tensors, rng_tensors, rank_json, common = None, [], [], {}, {}, {}, None
    try:
        finish_param_sync(model_chunks)
        chunks = as_chunks(model_chunks)
        if rank == 0:
            prepare_tmp_dir(directory, step)
        pieces = describe_model(chunks)
        optim_common = None
        if optimizer is not None:
            optim_pieces, optim_common = describe_optimizer(optimizer, chunks)
            pieces += optim_pieces
        metas = [piece_meta(p) for p in pieces]
        rank_json = {"rank": rank, "rng": to_json_tree(capture_rng(), "rng", rng_tensors)}
        if rank == 0:
            common = {"scheduler": scheduler_state, "scaler": scaler.state_dict() if scaler is not None else None,
                      "extra": extra, "optimizer": optim_common}
            common = to_json_tree(common, "common", common_tensors)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    gathered = comm.all_gather_object((error, metas), group)
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e]
    if failed:
        raise CheckpointError(f"saving step {step} to {directory} failed on rank {failed[0][0]}: {failed[0][1]}")
    plan: SavePlan = make_plan([m for _, m in gathered], rank)
    entries = []
    try:
        mine = [_sub_piece(pieces[w.piece], w.offsets, w.shape) for w in plan.writes]
        snaps = _snapshot(mine, async_save)
        entries = [(chunk_name(p.key, p.offsets), t) for p, t in zip(mine, snaps)]
        entries += sorted(rng_tensors.items()) + sorted(common_tensors.items())
        if rank == 0:
            handle._index = {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world,
                             "layout": current_layout(), "model_config": _config_dict(as_chunks(model_chunks)),
                             "tensors": plan.tensors, "common": common, "common_file": rank_file(0)}
    except Exception as e:  # e.g. out of pinned memory: reported collectively by wait(), never half-written
        handle._error = f"snapshot failed: {type(e).__name__}: {e}"
    handle.stall_s = time.perf_counter() - t0
    if handle._error is not None:
        _pending = handle if async_save else None
        if not async_save:
            handle.wait()  # raises on every rank
        return handle
    if async_save:
        handle._thread = threading.Thread(target=_write_rank, args=(handle, rank, entries, rank_json),
                                          name=f"megacore-ckpt-{step}", daemon=False)
        handle._thread.start()
        _pending = handle
        return handle
    _write_rank(handle, rank, entries, rank_json)
    handle.wait()
    handle.stall_s = time.perf_counter() - t0
    return handle
