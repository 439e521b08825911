"""Distributed checkpointing: sharded state, resharding on load, async save, atomic commit.

    from megacore.checkpoint import save_checkpoint, load_checkpoint, resolve_load_path
    handle = save_checkpoint(ckpt_dir, step, model_chunks, optimizer, scheduler_state={...},
                             scaler=scaler, extra={...}, async_save=True, keep_last=3)
    ...
    path = resolve_load_path(ckpt_dir, "latest")          # None when there is nothing to resume
    result = load_checkpoint(path, model_chunks, optimizer, scaler)   # -> LoadResult(step, extra, ...)

Format and guarantees: docs/checkpoint-format.md.
"""

from megacore.checkpoint.boxes import CkptView, LogicalView, Segment  # noqa: F401
from megacore.checkpoint.directory import list_checkpoints, prune, resolve_load_path  # noqa: F401
from megacore.checkpoint.errors import CheckpointError  # noqa: F401
from megacore.checkpoint.load import LoadResult, load_checkpoint  # noqa: F401
from megacore.checkpoint.lock import DirectoryInUse, DirectoryLock  # noqa: F401
from megacore.checkpoint.manager import CheckpointManager  # noqa: F401
from megacore.checkpoint.optim_state import FlatStateEntry, describe_optimizer  # noqa: F401
from megacore.checkpoint.save import (SaveHandle, pending_save, poll_pending, prepare_snapshot_buffers,  # noqa: F401
                                      save_checkpoint, wait_for_pending)
from megacore.checkpoint.sharded import ShardedPiece, describe_model  # noqa: F401

__all__ = [
    "CheckpointError", "CheckpointManager", "CkptView", "DirectoryInUse", "DirectoryLock", "FlatStateEntry", "LoadResult", "LogicalView", "SaveHandle", "Segment",
    "ShardedPiece", "describe_model", "describe_optimizer", "list_checkpoints", "load_checkpoint", "pending_save",
    "poll_pending", "prepare_snapshot_buffers", "prune", "resolve_load_path", "save_checkpoint", "wait_for_pending",
]
