"""Small collective helpers shared by DDP, the optimizers and grad clipping.

Group conventions used across ``megacore.distributed``:

* A single ``group`` argument (e.g. ``dp_group``) follows torch: ``None`` means the default (WORLD)
  group when ``torch.distributed`` is initialized, and "no communication" when it is not (a plain
  single-process run).
* ``tp_group`` arguments of grad-norm code are the exception: there ``None`` means "no tensor
  parallelism" (counting every replicated parameter on every rank of WORLD once would be wrong).
* A *sequence* of groups (``groups=(tp_group, pp_group)``) lists the groups to reduce over; ``None``
  entries and groups of size 1 are skipped ("that dimension is absent"), and a group object listed
  twice is used once. The groups must be orthogonal (no two share a rank other than the caller), so
  that reducing over each in turn equals one reduction over their product.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]

# torch 2.13 renamed the flat-tensor collectives; keep both spellings working (2.11 has only the old one).
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup = None) -> int:
    """Number of ranks in ``group`` (1 when torch.distributed is not initialized)."""
    if not is_distributed():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup = None) -> int:
    """This process's rank inside ``group`` (0 when torch.distributed is not initialized)."""
    if not is_distributed():
        return 0
    return dist.get_rank(group)


def active_groups(groups: Iterable[ProcessGroup]) -> list[dist.ProcessGroup]:
    """The distinct groups of size > 1 in ``groups`` (None entries skipped), in first-seen order."""
    if not is_distributed():
        return []
    out: list[dist.ProcessGroup] = []
    seen: set[int] = set()
    for g in groups:
        if g is None or id(g) in seen:
            continue
        seen.add(id(g))
        if dist.get_world_size(g) > 1:
            out.append(g)
    return out


def all_reduce_over(tensor: torch.Tensor, groups: Sequence[ProcessGroup], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place over each group of ``groups`` in turn (= over their product)."""
    for g in active_groups(groups):
        dist.all_reduce(tensor, op=op, group=g)
    return tensor


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """``output = sum over ranks of input[rank*n:(rank+1)*n]`` with ``n = output.numel()``.

    ``output`` may alias its own slice of ``input`` (in-place reduce-scatter).
    """
    return _reduce_scatter_flat(output, input, group=group, async_op=async_op)


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """``output[rank*n:(rank+1)*n] = input of rank`` with ``n = input.numel()``; input may alias its slice."""
    return _all_gather_flat(output, input, group=group, async_op=async_op)


def global_rank_of(group: ProcessGroup, group_rank_: int) -> int:
    """Global rank of rank ``group_rank_`` of ``group`` (for broadcast sources)."""
    if group is None or group is dist.group.WORLD:
        return group_rank_
    return dist.get_global_rank(group, group_rank_)


def comm_device(default: torch.device) -> torch.device:
    """Device for small control tensors (norms, flags): CUDA under NCCL, CPU under gloo."""
    if not is_distributed():
        return default
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return default
