"""The trainer's sums over the parallel layout: labelled tokens over data parallelism, the step's
loss (with the values that ride along) over every rank, the one-device parameter count, and the
all-ranks check that every weight is finite before a checkpoint is written.

Each function takes the live ``ParallelState`` (``megacore.parallel.topology``; None with one
process), the world size and the run's device; the collectives run on ``comm_device(device)``.
"""

from __future__ import annotations

import math
import torch
import torch.distributed as dist

from megacore.distributed.comm import comm_device
from megacore.sharding import peek_meta


def count_over_dp(local: float, state, world_size: int, device: torch.device):
    """Labelled tokens of the whole global batch: this rank's count summed over data parallelism.

    Without data parallelism that is the host count itself. Otherwise it is a one-element fp64
    tensor whose all-reduce is queued and never read here (under NCCL a collective only orders
    GPU streams, so the host does not wait): the loss is divided by the tensor, and the count
    is read later with the step's other numbers (``PendingStep``).
    """
    if world_size == 1 or state.dp_cp_size == 1:
        return local
    # torch.full is a fill kernel on the device: no host->device copy, which would sync.
    value = torch.full((1,), float(local), dtype=torch.float64, device=comm_device(device))
    dist.all_reduce(value, group=state.dp_cp_group)
    return value if value.device == device else value.to(device)


def sum_over_layout(local: torch.Tensor, *extra, state, world_size: int, device: torch.device) -> torch.Tensor:
    """``[global loss sum, *extra summed over ranks]`` (fp64, comm device) from ONE all-reduce
    over all ranks; not read here.

    Each DP/CP rank's last stage holds its share of the global mean loss; the TP ranks of a
    stage hold the same value, so only TP rank 0 adds it: the world sum is then the sum over
    DP, CP and PP. ``extra`` rides along, e.g. the stop vote (1 on ranks whose SIGTERM/SIGINT
    flag is set), so stopping needs no collective or host sync of its own; a device scalar (the
    MoE load-balancing sum) rides along without a read.
    """
    dev = comm_device(device)
    loss = local.detach().to(dev, torch.float64).reshape(1)
    if world_size > 1 and state.tp_rank != 0:
        loss = torch.zeros_like(loss)
    # torch.full fills on the device: no host->device copy (which would sync).
    values = torch.cat([loss, *(v.detach().to(dev, torch.float64).reshape(1) if isinstance(v, torch.Tensor)
                                else torch.full((1,), float(v), dtype=torch.float64, device=dev) for v in extra)])
    if world_size > 1:
        dist.all_reduce(values)
    return values


def global_param_count(chunks, state, world_size: int, device: torch.device) -> int:
    """Parameters of the one-device model: each local parameter counts at its global shape (TP
    shards and replicated KV heads alike), the tied output copy not at all, summed over stages."""
    from megacore.pipeline.tied import unwrap

    n = 0
    for c in chunks:
        for p in unwrap(c).parameters():
            if not peek_meta(p).shared_duplicate:
                n += math.prod((peek_meta(p).global_shape or p.shape))
    if world_size > 1 and state.pp_group is not None:
        t = torch.tensor([n], dtype=torch.float64, device=comm_device(device))
        dist.all_reduce(t, group=state.pp_group)
        n = int(t.item())
    return n


def weights_finite(chunks, world_size: int, device: torch.device) -> bool:
    """Whether every weight of every rank is finite: per (device, dtype), one multi-tensor
    max-|w| reduction (``torch._foreach_norm`` with ord=inf, a fused kernel on CUDA), a MAX
    all-reduce of the verdict and ONE read. The trainer calls it only before a checkpoint is
    written, where every queued step has been read already: the read waits for this reduction alone."""
    dev = comm_device(device)
    bad = torch.zeros(1, dtype=torch.float32, device=dev)
    groups: dict = {}
    for chunk in chunks:
        for p in chunk.parameters():
            t = p.detach()
            t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
            groups.setdefault((t.device, t.dtype), []).append(t)
    for tensors in groups.values():
        peaks = torch.stack([m.float() for m in torch._foreach_norm(tensors, float("inf"))])
        bad = torch.maximum(bad, (~torch.isfinite(peaks)).any().float().reshape(1).to(dev))
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)
