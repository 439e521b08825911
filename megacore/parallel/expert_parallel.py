"""Expert parallelism: the experts of every MoE layer split over the EP group, tokens carried to
their experts' rank and back by all-to-all (``parallel.expert``).

Rank ``r`` of an EP group of size ``P`` holds experts ``[r·E/P, (r+1)·E/P)``. Its tokens' ``T·k``
(token, slot) assignments, sorted by expert, are therefore sorted by destination rank too:

1. counts: an all-to-all of the per-expert counts ``[P, E/P]`` tells each rank how many rows every
   source sends to each of its experts (read on the host once: the split sizes);
2. dispatch: an all-to-all of the sorted token rows, split by destination rank;
3. the received rows are grouped by local expert (stable sort), each expert runs on its run, and
   the rows go back to arrival order;
4. combine: the reverse all-to-all returns each row to its source rank, which scales it by its
   router weight and adds it to its token.

The all-to-all is its own adjoint with the split sizes swapped, which is its backward. The EP group
lies inside the data-parallel group, so expert gradients are summed over the expert-data-parallel
group only, and the grad norm adds the expert part over EP (``megacore.distributed``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from megacore.config.support import Facts, check
from megacore.layers.moe.experts import Experts
from megacore.sharding import param_meta, peek_meta


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` split by ``input_splits`` go to the ranks of ``group``; ``output_splits`` rows
    arrive from each. Backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        back = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


def dispatch_and_compute(experts, x_sorted: torch.Tensor, counts_per_expert: torch.Tensor, group) -> torch.Tensor:
    """Steps 1-4 above for rows ``x_sorted`` [R, H] already sorted by global expert, with
    ``counts_per_expert`` [E] (device); returns the expert outputs in the same order."""
    size = dist.get_world_size(group)
    local = counts_per_expert.numel() // size
    send = counts_per_expert.reshape(size, local)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)  # recv[s, e]: rows from rank s for my expert e
    both = torch.cat([send.reshape(-1), recv.reshape(-1)]).tolist()  # the one host read
    sent, arrivals = both[:size * local], both[size * local:]
    input_splits = [sum(sent[s * local:(s + 1) * local]) for s in range(size)]
    output_splits = [sum(arrivals[s * local:(s + 1) * local]) for s in range(size)]
    rows, kept = x_sorted.shape[0], sum(input_splits)  # rows past ``kept``: dropped assignments
    x_recv = all_to_all(x_sorted[:kept], output_splits, input_splits, group)
    # Arrival order is (source rank, local expert); group the rows by local expert for the GEMMs.
    expert_of_row = torch.arange(local, device=x_recv.device).repeat(size).repeat_interleave(
        torch.tensor(arrivals, device=x_recv.device), output_size=x_recv.shape[0])
    by_expert = torch.argsort(expert_of_row, stable=True)
    per_expert = [sum(arrivals[s * local + e] for s in range(size)) for e in range(local)]
    y_grouped = experts.run_sorted(x_recv[by_expert], per_expert)
    y_recv = torch.empty_like(y_grouped).index_copy(0, by_expert, y_grouped)
    y_sorted = all_to_all(y_recv, input_splits, output_splits, group)
    if kept < rows:
        y_sorted = torch.cat([y_sorted, y_sorted.new_zeros((rows - kept, *y_sorted.shape[1:]))])
    return y_sorted


def apply_expert_parallel(model: nn.Module, group, rank: int, size: int) -> nn.Module:
    """Keep only this EP rank's experts in every MoE layer of a (meta) model, before it is
    materialized: each expert weight becomes its ``[E/P, ...]`` slice, marked with the global shape
    and slice (deterministic init and checkpoints see the whole tensor) and as an expert parameter
    (gradients reduced over expert-data-parallel ranks)."""
    if getattr(model, "config", None) is not None:  # the support table's rules on the model and the EP size
        check(Facts(model=model.config, expert=size))
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        total = module.linear_fc1.shape[0]
        local = total // size
        start = rank * local
        for name in ("linear_fc1", "linear_fc2"):
            full = getattr(module, name)
            part = nn.Parameter(torch.empty((local, *full.shape[1:]), device=full.device, dtype=full.dtype))
            meta = param_meta(part)
            meta.init = peek_meta(full).init or "normal"
            meta.global_shape = tuple(full.shape)
            meta.expert_slice = (start, start + local)
            setattr(module, name, part)
        module.dispatch = partial(dispatch_and_compute, group=group)
    return model
