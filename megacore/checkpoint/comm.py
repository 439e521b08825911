"""The few collectives checkpointing needs, as no-ops when torch.distributed is not initialized.

Only small Python objects (metadata, error strings) travel through them, always from the main
thread, at points every rank reaches in the same order.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def all_gather_object(obj: Any, group=None) -> list:
    if not initialized() or world_size(group) == 1:
        return [obj]
    out: list = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    if not initialized() or world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def raise_if_any(error: Optional[str], what: str, group=None) -> None:
    """Every rank raises when any rank reports an error, so no rank is left waiting in a collective."""
    from megacore.checkpoint.errors import CheckpointError

    errors = all_gather_object(error, group)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        prefix = f"{what} failed on rank {r}{more}: " if len(errors) > 1 else f"{what} failed: "
        raise CheckpointError(prefix + e)
