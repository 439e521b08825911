"""Global gradient-norm computation and clipping across every parallel dimension.

The global norm is the norm of the gradient of the whole (unsharded) model, each unique parameter
element counted exactly once::

    ||g||_2 = sqrt( sum over unique elements e of g_e^2 )

Each rank sums the squares of the gradient elements it is responsible for and the partial sums
are all-reduced (SUM; MAX for the inf-norm) over the groups that split the model between ranks:

* tensor-parallel shards (a param whose ParamMeta has a ``tp_layout``) differ per TP rank: summed over TP;
* TP-replicated params (norm weights, biases of row-parallel layers; ``is_tp_replicated(p)``) hold
  the same gradient on every TP rank: only TP rank 0 counts them;
* replicated rows of a TP-sharded param: a layout (``peek_meta(p).tp_layout``, a ``TPLayout``) may
  give one global row to several TP ranks (grouped QKV with ``tensor > num_query_groups``: the k/v
  rows of a KV group live on the ``tensor / num_query_groups`` ranks sharing it, and their
  gradients are summed over those ranks, so every holder has the same values). Only the owner
  counts such a row: rank r counts local row i iff ``layout.owned_mask(r)[i]`` (r is the lowest
  rank holding it). Each global row has exactly one owner, so the TP sum of the per-rank partial
  sums is ``sum over global rows of ||g_row||^2``, as on one device. See :func:`counted_grads`;
* pipeline stages hold different layers: summed over PP. The tied output copy of the embedding on
  the last stage (``param_meta(p).shared_duplicate = True``) is skipped, the first stage counts it;
* data-parallel replicas hold the same reduced gradient: DP is NOT in ``groups`` for a replicated
  optimizer; the distributed optimizer's shards are disjoint, so its DP group IS in ``groups``;
* expert params (``is_expert(p)``) are reduced over ``expert_groups`` (e.g. expert-TP, EP, PP,
  and expert-DP when sharded), dense ones over ``groups``; the two squared sums are added.

Non-finite norms (inf/nan) are returned as they are and never used to scale: clipping only
multiplies by ``min(1, max_norm / (norm + 1e-6))`` when the norm is finite.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megacore.distributed.comm import ProcessGroup, active_groups, all_reduce_over, comm_device, group_rank, group_size
from megacore.sharding import peek_meta

ParamPredicate = Callable[[torch.Tensor], bool]


def default_is_tp_replicated(p: torch.Tensor) -> bool:
    """A parameter is TP-replicated unless its ParamMeta has a ``tp_dim`` (TP-sharded params)."""
    return peek_meta(p).tp_dim is None


def is_shared_duplicate(p: torch.Tensor) -> bool:
    """True for a copy of a parameter owned elsewhere (tied embedding on the last pipeline stage)."""
    return bool(peek_meta(p).shared_duplicate)


def param_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """``p.main_grad`` (DDP's fp32 buffer view) when present, else ``p.grad``."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def counts_for_norm(p: torch.Tensor, tp_group: ProcessGroup = None,
                    is_tp_replicated: ParamPredicate = default_is_tp_replicated) -> bool:
    """Whether this rank counts ``p``'s gradient in the global norm (see the module docstring)."""
    if is_shared_duplicate(p):
        return False
    # tp_group=None means "no tensor parallelism" here (not WORLD, as in torch collectives).
    if tp_group is not None and group_size(tp_group) > 1 and group_rank(tp_group) != 0 and is_tp_replicated(p):
        return False
    return True


# (layout dim, global size, per-rank segments, rank, local shape) -> owned flat runs, or None for "all".
_OWNED_RUNS: dict[tuple, Optional[tuple[tuple[int, int], ...]]] = {}


def owned_flat_runs(p: torch.Tensor) -> Optional[tuple[tuple[int, int], ...]]:
    """Flat element runs ``(start, length)`` of ``p`` (row-major) that this TP rank counts in the
    norm, or None when it counts every element (no layout, or none of its local rows is owned by a
    lower rank).

    The layout ``L = peek_meta(p).tp_layout`` splits dim ``d`` of ``p``; this rank is
    ``peek_meta(p).tp_rank`` and counts local row i iff ``L.owned_mask(rank)[i]``. With ``p`` of
    shape ``(a_0, ..., a_k)``, ``m = a_(d+1)···a_k`` elements per row and ``o`` ranging over the
    ``a_0···a_(d-1)`` outer indices, local row i is the flat range ``[(o·a_d + i)·m, (o·a_d + i + 1)·m)``;
    adjacent ranges merge. Computed once per (layout, rank, shape) and cached: a few runs per
    parameter (e.g. a non-owner's QKV shard: its query rows, before the replicated k/v rows).
    """
    layout = peek_meta(p).tp_layout
    if layout is None:
        return None
    rank = int((peek_meta(p).tp_rank or 0))
    shape = tuple(p.shape)
    key = (layout.dim, layout.global_size, layout.per_rank, rank, shape)
    if key in _OWNED_RUNS:
        return _OWNED_RUNS[key]
    owned = layout.owned_mask(rank)
    d = layout.dim
    if len(shape) <= d or shape[d] != owned.numel():
        raise ValueError(f"a parameter of shape {list(shape)} does not match its TP layout ({owned.numel()} local "
                         f"rows along dim {d}); the layout describes another tensor")
    runs: Optional[tuple[tuple[int, int], ...]] = None
    if not bool(owned.all()):
        rows, inner, mask = shape[d], math.prod(shape[d + 1:]), owned.tolist()
        merged: list[list[int]] = []
        for o in range(math.prod(shape[:d])):
            for i, mine in enumerate(mask):
                if not mine:
                    continue
                start = (o * rows + i) * inner
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1][1] += inner
                else:
                    merged.append([start, inner])
        runs = tuple((a, n) for a, n in merged)
    _OWNED_RUNS[key] = runs
    return runs


def counted_grads(p: torch.Tensor, grad: Optional[torch.Tensor], start: int = 0, tp_group: ProcessGroup = None,
                  is_tp_replicated: ParamPredicate = default_is_tp_replicated) -> list[torch.Tensor]:
    """The parts of ``grad`` this rank counts in the global norm (the module docstring's rules).

    ``grad`` holds the flat elements ``[start, start + grad.numel())`` of ``p``'s gradient: the
    whole gradient (``start = 0``, any shape), or a distributed-optimizer shard of it. Returns
    ``[]`` when this rank does not count ``p`` (:func:`counts_for_norm`), ``[grad]`` when it counts
    every element, else views of ``grad`` (no copies when ``grad`` is contiguous): the overlaps of
    the range with :func:`owned_flat_runs`. Replicated rows are dropped on non-owner ranks whatever
    ``tp_group`` says: the layout alone says which rank owns them.
    """
    if grad is None or not counts_for_norm(p, tp_group, is_tp_replicated):
        return []
    runs = owned_flat_runs(p)
    if runs is None:
        return [grad]
    flat = grad.reshape(-1)
    end = start + flat.numel()
    out = []
    for a, n in runs:
        lo, hi = max(a, start), min(a + n, end)
        if lo < hi:
            out.append(flat[lo - start:hi - start])
    return out


def local_norm_power(grads: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """fp32 scalar: ``sum |g|^p`` over ``grads`` (``max |g|`` for p = inf), computed on their devices."""
    out = torch.zeros((), dtype=torch.float32, device=device)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if g is not None and g.numel() > 0:
            by_device.setdefault(g.device, []).append(g)
    for dev, tensors in by_device.items():
        try:
            norms = torch._foreach_norm(tensors, norm_type, dtype=torch.float32)
        except (TypeError, RuntimeError):  # older signature / mixed dtypes
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=torch.float32) for t in tensors]
        norms = torch.stack([n.float() for n in norms])
        part = norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()
        out = torch.maximum(out, part.to(device)) if math.isinf(norm_type) else out + part.to(device)
    return out


def global_grad_norm(grads: Sequence[torch.Tensor], groups: Sequence[ProcessGroup] = (), norm_type: float = 2.0,
                     expert_grads: Sequence[torch.Tensor] = (), expert_groups: Optional[Sequence[ProcessGroup]] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Global norm of already-filtered gradients: the caller passes exactly the grads this rank counts.

    ``groups`` (and ``expert_groups`` for ``expert_grads``) are reduced over in turn; when
    ``expert_groups`` is None there is no expert set (every rank must agree on that).
    Returns an fp32 scalar tensor on the grads' device.
    """
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(f"norm_type={norm_type} must be positive (2.0 for L2, inf for max)")
    if device is None:
        first = next((g for g in list(grads) + list(expert_grads) if g is not None), None)
        device = first.device if first is not None else torch.device("cpu")
    is_inf = math.isinf(norm_type)
    op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
    cdev = comm_device(device)

    def reduced(gs, gr):
        part = local_norm_power(gs, norm_type, device)
        if active_groups(gr):
            part = all_reduce_over(part.to(cdev), gr, op=op).to(device)
        return part

    total = reduced(grads, groups)
    if expert_groups is not None:
        ex = reduced(expert_grads, expert_groups)
        total = torch.maximum(total, ex) if is_inf else total + ex
    return total if is_inf else total.pow(1.0 / norm_type)


def scale_grads_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Multiply ``grads`` by ``min(1, max_norm / (total_norm + 1e-6))`` if ``total_norm`` is finite.

    No host sync: the coefficient stays a device tensor (1 when the norm is inf/nan).
    """
    coef = (max_norm / (total_norm.float() + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            by_device.setdefault((g.device, g.dtype), []).append(g)
    for (dev, dt), tensors in by_device.items():
        c = coef.to(dev)
        try:
            torch._foreach_mul_(tensors, c)
        except (TypeError, RuntimeError):
            for t in tensors:
                t.mul_(c.to(dt))


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, *, groups: Sequence[ProcessGroup] = (),
                   tp_group: ProcessGroup = None, is_tp_replicated: ParamPredicate = default_is_tp_replicated,
                   is_expert: Optional[ParamPredicate] = None, expert_groups: Sequence[ProcessGroup] = (),
                   expert_tp_group: ProcessGroup = None, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of ``params`` (``main_grad`` if present, else ``grad``) to a global norm.

    Args:
        params: this rank's parameters (each rank passes its own; all ranks must call).
        max_norm: clip threshold; ``0`` or ``inf`` only computes the norm.
        groups: groups the dense model is split over, e.g. ``(tp_group, pp_group)``; add the DP group
            only when gradients are sharded over DP (they are not after a DDP all-reduce).
        tp_group: the TP group, to count TP-replicated params once (on TP rank 0); None: no TP.
        is_tp_replicated: predicate marking params replicated across TP.
        is_expert / expert_groups / expert_tp_group: expert params and their groups (see module doc).
        norm_type: 2.0 or ``inf``.
        error_if_nonfinite: raise if the norm is inf/nan instead of returning it.

    Returns the global norm (fp32 scalar tensor) before clipping, identical on every rank.
    Do not use this on model params under the distributed optimizer (main_grad is only valid in the
    local shard there); ``DistributedOptimizer.step`` clips its shards itself.
    """
    params = [p for p in params if param_grad(p) is not None]
    dense, expert = [], []
    for p in params:
        (expert if is_expert is not None and is_expert(p) else dense).append(p)
    dense_norm = [g for p in dense for g in counted_grads(p, param_grad(p), 0, tp_group, is_tp_replicated)]
    etp = expert_tp_group if expert_tp_group is not None else tp_group
    expert_norm = [g for p in expert for g in counted_grads(p, param_grad(p), 0, etp, is_tp_replicated)]
    device = param_grad(params[0]).device if params else None
    total = global_grad_norm(dense_norm, groups, norm_type, expert_norm,
                             expert_groups if is_expert is not None else None, device=device)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total gradient norm is {float(total)}; gradients hold inf/nan (lower the LR, "
                           "enable loss scaling for fp16, or pass error_if_nonfinite=False to skip the step instead)")
    if max_norm and max_norm > 0 and not math.isinf(max_norm):
        scale_grads_([param_grad(p) for p in params], max_norm, total)
    return total
