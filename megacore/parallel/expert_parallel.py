"""Expert parallelism: the experts of every MoE layer split over the EP group, tokens carried to
their experts' rank and back by all-to-all (``parallel.expert``).

Rank ``r`` of an EP group of size ``P`` holds experts ``[r·E/P, (r+1)·E/P)``. Its tokens' ``T·k``
(token, slot) assignments, sorted by expert, are therefore sorted by destination rank too:

1. counts: an all-to-all of the per-expert counts ``[P, E/P]`` tells each rank how many rows every
   source sends to each of its experts (read on the host once: the split sizes; with a fixed
   capacity, ``model.moe_pad_to_capacity``, every split is known and nothing is read:
   :func:`dispatch_padded_and_compute`);
2. dispatch: an all-to-all of the sorted token rows, split by destination rank;
3. the received rows are grouped by local expert (stable sort), each expert runs on its run, and
   the rows go back to arrival order;
4. combine: the reverse all-to-all returns each row to its source rank, which scales it by its
   router weight and adds it to its token.

The all-to-all is its own adjoint with the split sizes swapped, which is its backward. The EP group
lies inside the data-parallel group, so expert gradients are summed over the expert-data-parallel
group only, and the grad norm adds the expert part over EP (``megacore.distributed``).

The all-gather dispatcher (``parallel.expert_dispatcher: all_gather``, for small EP groups) moves
every row to every rank instead: with ``X_s`` rank s's kept sorted rows and ``Y_s`` their outputs,

1. counts: one all-gather of the per-expert counts ``[P, E]`` (the one host read);
2. gather: ``X = [X_0; ...; X_{P-1}]`` on every rank (all-gather of the rows);
3. rank r picks the rows of its experts from each source, runs them grouped by local expert, and
   writes the outputs into ``Z_r``: zeros except at those rows;
4. scatter: ``Y_s = rows of source s in Σ_r Z_r`` (a reduce-scatter; exactly one rank's ``Z_r``
   is non-zero at each row, so the sum is a selection).

Steps 2 and 4 are each other's adjoint: the backward of the gather is the reduce-scatter of the
gradients, that of the scatter the all-gather. Its traffic is P times the all-to-all's, its
exchange needs no per-destination split sizes: the simpler choice for 2-4 ranks.

Expert tensor parallelism (``parallel.expert_tensor`` = ``parallel.tensor``, :func:`apply_expert_tensor_parallel`)
splits every expert's hidden units over the ETP group as the dense MLP splits over TP: fc1 [E, 2F, H]
by its output rows, rank r holding ``[gate_r; up_r]`` (F/t each), fc2 [E, H, F] by its input
columns ``F_r``. For rows x that every rank of the group holds (the TP ranks route the same tokens)::

    y = fc2(act(fc1(x))) = Σ_r fc2[:, :, F_r] · act(fc1[gate_r; up_r] · x)

(the activation is element-wise per hidden unit, so it splits with them): each rank computes its
term and the terms are summed by an all-reduce over the ETP group. Backward: the output gradient is
the same on every rank (the all-reduce passes it through), and the input gradient is the sum of the
ranks' partial input gradients (an all-reduce at the entry: ``copy_to_tp``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from megacore.config import ConfigError
from megacore.config.support import Facts, check
from megacore.layers.moe.experts import Experts
from megacore.parallel import collectives as C
from megacore.sharding import TPLayout, param_meta, peek_meta

DISPATCHERS = ("all_to_all", "all_gather")


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


def dispatch_padded_and_compute(experts, x_slots: torch.Tensor, capacity: int, group) -> torch.Tensor:
    """The all-to-all exchange at a fixed capacity (``model.moe_pad_to_capacity``): no host read.

    ``x_slots`` [E·C, H] holds every global expert's C slots in expert order (empty slots are zero
    rows), so the rows for rank r are the contiguous block ``[r·E_l·C, (r+1)·E_l·C)`` (E_l = E/P)
    and every split is E_l·C rows, known without exchanging counts. Arrivals are ordered
    (source, local expert, slot); viewing them as [P, E_l, C] and swapping the first two axes groups
    them by local expert, P·C rows each, for the grouped GEMMs; the reverse view and the reverse
    all-to-all return every slot's output to its source, in the order it was sent."""
    size = dist.get_world_size(group)
    local = x_slots.shape[0] // (capacity * size)
    split = [local * capacity] * size
    x_recv = all_to_all(x_slots, split, split, group)
    width = x_recv.shape[-1]
    x_grouped = x_recv.view(size, local, capacity, width).transpose(0, 1).reshape(local * size * capacity, width)
    ends = torch.arange(1, local + 1, device=x_recv.device, dtype=torch.int32) * (size * capacity)
    y_grouped = experts.compute(x_grouped, ends)
    y_recv = y_grouped.view(local, size, capacity, width).transpose(0, 1).reshape(size * local * capacity, width)
    return all_to_all(y_recv, split, split, group)


def _padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class _GatherRows(torch.autograd.Function):
    """forward: ``[X_0; ...; X_{P-1}]`` (rank s sends its ``sizes[s]`` rows); backward: rank s's
    rows of the gradient summed over the ranks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        most = max(sizes)
        parts = [x.new_empty((most, *x.shape[1:])) for _ in sizes]
        dist.all_gather(parts, _padded_rows(x.contiguous(), most), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return _scatter_rows(grad, ctx.sizes, ctx.group), None, None


def _scatter_rows(z: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """This rank's rows of ``Σ_r z_r`` (``z`` stacks every rank's rows, ``sizes[s]`` each): one
    all-reduce of the padded stack, then a slice (gloo has no uneven reduce-scatter)."""
    most, rank = max(sizes), dist.get_rank(group)
    starts = [sum(sizes[:s]) for s in range(len(sizes))]
    padded = torch.stack([_padded_rows(z[a:a + n], most) for a, n in zip(starts, sizes)])
    dist.all_reduce(padded, group=group)
    return padded[rank, :sizes[rank]]


class _ScatterRows(torch.autograd.Function):
    """forward: this rank's rows of ``Σ_r Z_r``; backward: the all-gather of the gradients."""

    @staticmethod
    def forward(ctx, z, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _scatter_rows(z.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _GatherRows.apply(grad, ctx.sizes, ctx.group), None, None


def gather_and_compute(experts, x_sorted: torch.Tensor, counts_per_expert: torch.Tensor, group) -> torch.Tensor:
    """The all-gather dispatcher (steps 1-4 of the module docstring's second list): the same
    contract as :func:`dispatch_and_compute`."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    total = counts_per_expert.numel()
    local = total // size
    every = torch.empty((size, total), dtype=counts_per_expert.dtype, device=counts_per_expert.device)
    dist.all_gather(list(every.unbind(0)), counts_per_expert.contiguous(), group=group)
    counts = every.tolist()  # the one host read: counts[s][e] rows of source s for expert e
    sizes = [sum(c) for c in counts]
    rows, kept = x_sorted.shape[0], sizes[rank]  # rows past ``kept``: dropped assignments
    x_all = _GatherRows.apply(x_sorted[:kept], sizes, group)
    # My experts' rows, grouped by local expert (then by source): their indices in x_all.
    pieces, per_expert = [], []
    for e in range(rank * local, (rank + 1) * local):
        n_e = 0
        for s in range(size):
            start = sum(sizes[:s]) + sum(counts[s][:e])
            pieces.append(torch.arange(start, start + counts[s][e]))
            n_e += counts[s][e]
        per_expert.append(n_e)
    index = torch.cat(pieces).to(x_all.device)
    y_mine = experts.run_sorted(x_all.index_select(0, index), per_expert)
    z = x_all.new_zeros((x_all.shape[0], *y_mine.shape[1:])).index_copy(0, index, y_mine)
    y_sorted = _ScatterRows.apply(z, sizes, group)
    return _padded_rows(y_sorted, rows)


class ExpertTensorSplit:
    """``Experts.tensor_split`` over an ETP group (the module docstring's last formula)."""

    def __init__(self, group):
        self.group = group

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return C.copy_to_tp(x, self.group)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return C.reduce_from_tp(y, self.group)


def apply_expert_tensor_parallel(model: nn.Module, group, rank: int, size: int) -> nn.Module:
    """Split every expert's hidden units over the ETP ``group`` (after :func:`apply_expert_parallel`,
    before materializing): fc1 keeps rows ``[gate_r; up_r]`` (or ``F_r`` ungated), fc2 columns
    ``F_r``, each described by a ``TPLayout`` (init, checkpoints and the grad norm see the whole
    tensor), and ``Experts.tensor_split`` sums the partial outputs over the group."""
    if size == 1:
        return model
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        ffn = module.linear_fc2.shape[-1]
        if ffn % size != 0:
            raise ConfigError(f"model.moe_ffn_hidden_size={ffn} is not divisible by parallel.expert_tensor={size}; "
                              "choose an expert width that is a multiple of the expert-tensor-parallel size")
        layouts = {"linear_fc1": TPLayout.fused(1, [ffn, ffn] if module.gated else [ffn], size),
                   "linear_fc2": TPLayout.contiguous(2, ffn, size)}
        for name, layout in layouts.items():
            full = getattr(module, name)
            old = peek_meta(full)
            shape = list(full.shape)
            shape[layout.dim] = layout.local_size
            part = nn.Parameter(torch.empty(shape, device=full.device, dtype=full.dtype))
            meta = param_meta(part)
            meta.init = old.init or "normal"
            meta.global_shape = old.global_shape or tuple(full.shape)
            meta.expert_slice = old.expert_slice
            meta.tp_layout, meta.tp_rank = layout, rank
            setattr(module, name, part)
        module.tensor_split = ExpertTensorSplit(group)
    return model


def apply_expert_parallel(model: nn.Module, group, rank: int, size: int, dispatcher: str = "all_to_all") -> nn.Module:
    """Keep only this EP rank's experts in every MoE layer of a (meta) model, before it is
    materialized: each expert weight becomes its ``[E/P, ...]`` slice, marked with the global shape
    and slice (deterministic init and checkpoints see the whole tensor) and as an expert parameter
    (gradients reduced over expert-data-parallel ranks). ``dispatcher``: how rows reach their
    experts, ``"all_to_all"`` or ``"all_gather"`` (the module docstring)."""
    if dispatcher not in DISPATCHERS:
        raise ConfigError(f"parallel.expert_dispatcher={dispatcher!r} is not known; use one of {list(DISPATCHERS)}")
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
        exchange = dispatch_and_compute if dispatcher == "all_to_all" else gather_and_compute
        module.dispatch = partial(exchange, group=group)
        if dispatcher == "all_to_all":
            module.dispatch_padded = partial(dispatch_padded_and_compute, group=group)
    return model
