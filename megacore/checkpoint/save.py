"""Saving: describe -> plan -> snapshot (the only stall) -> write (background) -> commit (collective).

    handle = save_checkpoint(dir, step, model_chunks, optimizer, scheduler_state={"step": step},
                             scaler=scaler, extra={"consumed_samples": n}, async_save=True)
    ...                       # training continues while a thread writes the files
    handle.wait()             # before the next save and before exit (save_checkpoint waits itself)

The snapshot copies this rank's pieces into host memory: on GPU one pass of ``non_blocking``
copies into pinned buffers reused between saves, then one wait (megacore.checkpoint.snapshot).
``handle.stall_s`` measures describe + plan + snapshot; the writer thread then serializes, hashes,
writes and fsyncs from the host copies. ``wait()`` joins it, checks every rank succeeded, and rank 0
writes ``index.json`` and ``COMPLETE``, renames ``iter_N.tmp`` to ``iter_N`` and replaces ``latest``
(see megacore.checkpoint.directory). ``prepare_snapshot_buffers`` allocates the pinned buffers ahead
of the first save (e.g. at startup), so that save too stalls only for the copy.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Optional

import torch

from megacore.checkpoint import comm, snapshot
from megacore.checkpoint.boxes import slices
from megacore.checkpoint.directory import COMPLETE, INDEX, commit, iter_name, prepare_tmp_dir, rank_file, rank_meta
from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.optim_state import describe_optimizer
from megacore.checkpoint.plan import SavePlan, chunk_name, make_plan, piece_meta
from megacore.checkpoint.rng import capture_rng, current_layout
from megacore.checkpoint.serialize import file_digest, read_json, to_json_tree, write_json, write_safetensors
from megacore.checkpoint.sharded import ShardedPiece, as_chunks, describe_model, finish_param_sync
from megacore.checkpoint.snapshot import SnapshotStats

FORMAT = "megacore-checkpoint"
VERSION = 1

# Test-only: seconds each rank's writer sleeps before writing its files, to make a save slow enough
# to be interrupted (tests of the launcher's stop grace). Never set it in a real run.
TEST_SLOW_WRITE_ENV = "MEGACORE_TEST_SLOW_CHECKPOINT_WRITE_S"

_pending: Optional["SaveHandle"] = None


class SaveHandle:
    """One save in flight (async) or done (sync). ``wait()`` is collective: call it on every rank."""

    def __init__(self, root: str, step: int, tmp: str, keep_last: Optional[int], group=None):
        self.root, self.step, self.tmp, self.keep_last, self.group = root, step, tmp, keep_last, group
        self.path: Optional[str] = None      # the committed iter_N directory, once done
        self.stall_s = 0.0                   # time training was blocked (describe + plan + snapshot)
        self.snapshot_s = 0.0                # of which the snapshot (pinned allocation + copies + the wait)
        self.snapshot_bytes = 0              # bytes copied to host memory by the snapshot
        self.d2h_s: Optional[float] = None   # GPU time of the device->host copy pass (CUDA events)
        self.alloc_s = 0.0                   # of snapshot_s: allocating new pinned buffers (0 when reused)
        self.alloc_bytes = 0                 # pinned bytes newly allocated by this save
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
        """Every file a load reads gets a digest: the safetensors files (each rank's writer hashed
        its own) and the rank json files in ``index.json``, ``index.json`` itself in ``COMPLETE``."""
        index = self._index
        files = {}
        for r in range(index["world_size"]):
            path = os.path.join(self.tmp, rank_meta(r))
            meta = read_json(path, self.tmp)
            files[rank_file(r)] = meta["file"]
            sha, size = file_digest(path)
            files[rank_meta(r)] = {"sha256": sha, "size": size}
        index["files"] = files
        write_json(os.path.join(self.tmp, INDEX), index)
        sha, size = file_digest(os.path.join(self.tmp, INDEX))
        write_json(os.path.join(self.tmp, COMPLETE), {"step": self.step, "time": time.time(),
                                                      "index": {"sha256": sha, "size": size}})
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


def _sub_piece(p: ShardedPiece, offsets: tuple, shape: tuple) -> ShardedPiece:
    if tuple(offsets) == tuple(p.offsets) and tuple(shape) == p.shape:
        return p
    view = p.tensor[slices([a - b for a, b in zip(offsets, p.offsets)], shape)]
    return ShardedPiece(p.key, p.global_shape, tuple(offsets), view)


def _describe(model_chunks, optimizer) -> tuple[list[ShardedPiece], Optional[dict]]:
    """This rank's pieces (model, then optimizer) and the optimizer's JSON-like common state."""
    pieces = describe_model(as_chunks(model_chunks))
    optim_common = None
    if optimizer is not None:
        optim_pieces, optim_common = describe_optimizer(optimizer, as_chunks(model_chunks))
        pieces += optim_pieces
    return pieces, optim_common


def _gather_plan(error: Optional[str], pieces: list[ShardedPiece], what: str, rank: int, group) -> tuple[SavePlan, list]:
    """Collective: every rank's metadata -> the plan, and this rank's ``(chunk name, view)`` to write."""
    metas = [piece_meta(p) for p in pieces] if error is None else []
    gathered = comm.all_gather_object((error, metas), group)
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e]
    if failed:
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")
    plan = make_plan([m for _, m in gathered], rank)
    mine = [_sub_piece(pieces[w.piece], w.offsets, w.shape) for w in plan.writes]
    return plan, [(chunk_name(p.key, p.offsets), p.tensor) for p in mine]


def prepare_snapshot_buffers(model_chunks, optimizer=None, group=None) -> Optional[SnapshotStats]:
    """Allocate the pinned buffers the next ``save_checkpoint`` of these chunks will copy into (collective).

    Call it once before training (after building the optimizer and loading any checkpoint) so the
    first save does not pay for page-locking several GB of host memory. Returns what was allocated
    (``alloc_bytes``, ``alloc_s``), or None when nothing is pinned (no CUDA tensor). A save whose
    pieces differ (another layout, optimizer state created later) reallocates by itself.
    """
    rank = comm.rank(group)
    error, pieces = None, []
    try:
        finish_param_sync(model_chunks)
        pieces, _ = _describe(model_chunks, optimizer)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    _, items = _gather_plan(error, pieces, "preparing checkpoint buffers", rank, group)
    if not snapshot.uses_pool(items):
        return None
    return snapshot.default_pool().reserve(snapshot.snapshot_keys(items))


def _config_dict(chunks) -> Optional[dict]:
    config = getattr(chunks[0], "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return None


def _write_rank(handle: SaveHandle, rank: int, entries: list[tuple[str, torch.Tensor]], meta: dict) -> None:
    start = time.perf_counter()
    try:
        slow = float(os.environ.get(TEST_SLOW_WRITE_ENV) or 0)
        if slow > 0:
            time.sleep(slow)
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
    error, pieces, common_tensors, rng_tensors, rank_json, common = None, [], {}, {}, {}, None
    try:
        finish_param_sync(model_chunks)
        if rank == 0:
            prepare_tmp_dir(directory, step)
        pieces, optim_common = _describe(model_chunks, optimizer)
        rank_json = {"rank": rank, "rng": to_json_tree(capture_rng(), "rng", rng_tensors)}
        if rank == 0:
            common = {"scheduler": scheduler_state, "scaler": scaler.state_dict() if scaler is not None else None,
                      "extra": extra, "optimizer": optim_common}
            common = to_json_tree(common, "common", common_tensors)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    plan, items = _gather_plan(error, pieces, f"saving step {step} to {directory}", rank, group)
    entries, stats = [], None
    try:
        snaps, stats = snapshot.take_snapshot(items, async_save)
        handle.snapshot_s, handle.snapshot_bytes, handle.d2h_s = stats.seconds, stats.bytes, stats.d2h_s
        handle.alloc_s, handle.alloc_bytes = stats.alloc_s, stats.alloc_bytes
        entries = [(name, t) for (name, _), t in zip(items, snaps)]
        entries += sorted(rng_tensors.items()) + sorted(common_tensors.items())
        if rank == 0:
            handle._index = {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world,
                             "layout": current_layout(), "model_config": _config_dict(as_chunks(model_chunks)),
                             "tensors": plan.tensors, "common": common, "common_file": rank_file(0)}
    except Exception as e:  # reported collectively by wait(), never half-written
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
        if stats is not None and stats.pooled:
            snapshot.default_pool().reader = handle._thread  # the pool joins it before its buffers are reused
        _pending = handle
        return handle
    _write_rank(handle, rank, entries, rank_json)
    handle.wait()
    handle.stall_s = time.perf_counter() - t0
    return handle
