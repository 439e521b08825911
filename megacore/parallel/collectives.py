"""Differentiable collectives for tensor and sequence parallelism, each defined once.

Notation: t = group size, r = this rank's index in the group, x_r = rank r's input, ``Σ_r`` a sum
over the group, ``[a_0 | ... | a_{t-1}]`` concatenation along the stated dim, ``chunk_r(x)`` the r-th
of t equal chunks. Activations are [B, S, H]; the sequence dim is 1. The sequence-parallel (SP)
functions work on the tokens: ``tok(x)`` is x viewed as [B·S, H] (batch-major), and an SP shard is
``chunk_r(tok(x))`` stored as [B, S/t, H] (see "Sequence-parallel shards" below).

============================  ==============================  ==============================
function                      forward                         backward (of the output grad g)
============================  ==============================  ==============================
copy_to_tp                    y = x                           dx = Σ_r g_r           (all-reduce)
reduce_from_tp                y = Σ_r x_r     (all-reduce)    dx = g
scatter_to_tp_last_dim        y = chunk_r(x, -1)              dx = [g_0 | ... | g_{t-1}] (-1)
gather_from_tp_last_dim       y = [x_0 | ... | x_{t-1}] (-1)  dx = chunk_r(g, -1)
scatter_to_sp                 y = chunk_r(tok(x))             dx = [g_0 | ... | g_{t-1}] (tokens)
gather_from_sp                y = [x_0 | ... | x_{t-1}]       dx = chunk_r(tok(Σ_r g_r)) (reduce-scatter)
                              (tokens)                        or chunk_r(tok(g)) if the grad is
                                                              not a partial sum
reduce_scatter_to_sp          y = chunk_r(tok(Σ_r x_r))       dx = [g_0 | ... | g_{t-1}] (tokens)
all_to_all                    split dim a, exchange, cat      the inverse all-to-all
                              along dim b
============================  ==============================  ==============================

``group=None`` (or a group of one rank, or torch.distributed not initialized) means "no
parallelism": every function is then the identity.

Sequence-parallel shards: rank r holds the r-th contiguous 1/t of the batch's B·S tokens, in a
tensor of shape [B, S/t, H]. Everything that runs on SP shards (norms, dropout, residual adds,
position-embedding adds) is token-wise, so which tokens a rank holds does not matter, only that
every SP function agrees. Splitting the flattened tokens makes every SP collective a plain
dim-0 collective on a view: no transposing copies before and after it (splitting dim 1 of a
batch-major [B, S, H] would need them whenever B > 1), and under compile the simplest all-gather /
reduce-scatter patterns for inductor. For B = 1 it is the same as splitting the sequence.

Backends: NCCL uses the flat-tensor collectives (``all_gather_into_tensor`` /
``reduce_scatter_tensor``, spelled ``all_gather_single`` / ``reduce_scatter_single`` from torch
2.13). torch 2.13's gloo implements those too (checked), but older gloo builds reject
reduce-scatter, so on gloo we use the list ``all_gather`` and ``all_reduce`` + slice, which every
build supports; the CPU test sizes make the extra traffic irrelevant. ``FORCE_FLAT_COLLECTIVES``
lets the tests run the NCCL code path on gloo.

Under ``torch.compile`` the flat path is spelled with the functional collectives
(``torch.distributed._functional_collectives``) on dim 0, with a chunk/cat for other dims, so each
TP layer traces into one graph, collectives included, in the form inductor's overlap passes
recognize (all-gather feeding a matmul, a matmul feeding a reduce-scatter:
``parallel.tp_comm_overlap``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]

SEQ_DIM = 1
FORCE_FLAT_COLLECTIVES = False

# torch 2.13 renamed the flat collectives; 2.11 only has the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------- raw
def group_size(group: ProcessGroup) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _use_flat(group: ProcessGroup) -> bool:
    return FORCE_FLAT_COLLECTIVES or dist.get_backend(group) != "gloo"


def _functional(group: ProcessGroup) -> bool:
    """Trace the functional collectives: compiling, on a backend with flat collectives."""
    return torch.compiler.is_compiling() and _use_flat(group)


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _split_size(x: torch.Tensor, dim: int, t: int, what: str) -> int:
    n = x.shape[dim]
    if n % t != 0:
        raise ValueError(f"{what}: dim {dim} of a tensor of shape {tuple(x.shape)} has size {n}, not divisible "
                         f"by the group size {t}; pad it (e.g. choose a sequence length that is a multiple of {t})")
    return n // t


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, group: ProcessGroup, op: str = "sum") -> torch.Tensor:
    """Sum (or ``op``: "sum", "max", "min") over the group; returns a new tensor (the input is not
    modified). The op is a string because torch.compile cannot hash ``dist.ReduceOp`` values."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op={op!r} is not known; use one of {sorted(_REDUCE_OPS)}")
    if group_size(group) == 1:
        return x
    if _functional(group):
        return _funcol().all_reduce(x.contiguous(), op, group)
    out = x.contiguous().clone()
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
    return out


def chunk(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (contiguous copy)."""
    t = group_size(group)
    if t == 1:
        return x
    n = _split_size(x, dim, t, "chunk")
    return x.narrow(dim, group_rank(group) * n, n).contiguous()


def all_gather(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """[x_0 | ... | x_{t-1}] along ``dim``."""
    t = group_size(group)
    if t == 1:
        return x
    x = x.contiguous()
    if _functional(group):
        # Gather along dim 0, then chunk + cat into place: funcol's own gather_dim > 0 helper is not
        # traceable in torch 2.11 (a graph break per call), and this split/cat form is the one
        # inductor's micro-pipeline pass matches.
        gathered = _funcol().all_gather_tensor(x, 0, group)
        return gathered if dim % x.dim() == 0 else torch.cat(torch.chunk(gathered, t, dim=0), dim=dim)
    if _use_flat(group):
        # The flat collective concatenates along dim 0: gather there and move the dim into place.
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty((t * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_flat(out, moved, group=group)
        return out.movedim(0, dim).contiguous()
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """chunk_r(Σ_r x_r) along ``dim``."""
    t = group_size(group)
    if t == 1:
        return x
    n = _split_size(x, dim, t, "reduce_scatter")
    if _functional(group):
        if dim % x.dim() != 0:  # bring rank j's chunk to the j-th block of dim 0 (see all_gather)
            x = torch.cat(torch.chunk(x, t, dim=dim), dim=0)
        return _funcol().reduce_scatter_tensor(x.contiguous(), "sum", 0, group)
    if _use_flat(group):
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty((n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_flat(out, moved, group=group)
        return out.movedim(0, dim).contiguous()
    full = all_reduce(x, group)  # gloo fallback: all-reduce then keep this rank's slice
    return full.narrow(dim, group_rank(group) * n, n).contiguous()


def all_to_all_single_dim(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup) -> torch.Tensor:
    """Split ``x`` into t chunks along ``scatter_dim``, send chunk j to rank j, concatenate the chunks
    received along ``gather_dim``. Shapes: ``scatter_dim`` shrinks t-fold, ``gather_dim`` grows t-fold."""
    t = group_size(group)
    if t == 1:
        return x
    _split_size(x, scatter_dim, t, "all_to_all")
    # all_to_all_single exchanges equal chunks of dim 0 (gloo supports it; the list form it lacks
    # for uneven sizes is not needed here).
    send = torch.stack(x.chunk(t, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


# ---------------------------------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return chunk(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_is_partial):
        ctx.dim, ctx.group, ctx.partial = dim, group, grad_is_partial
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.partial:
            return reduce_scatter(g, ctx.dim, ctx.group), None, None, None
        return chunk(g, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all_single_dim(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_single_dim(g, gather_dim, scatter_dim, ctx.group), None, None, None


def _skip(group: ProcessGroup) -> bool:
    return group_size(group) == 1


# ------------------------------------------------------------------------------------- public API
def copy_to_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Enter a TP region. fwd: y = x (any shape). bwd: dx = Σ_r g_r (all-reduce). Shape unchanged."""
    return x if _skip(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a TP region. fwd: y = Σ_r x_r (all-reduce). bwd: dx = g. Shape unchanged."""
    return x if _skip(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp_last_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[..., N] -> [..., N/t]: fwd keeps chunk r of the last dim; bwd all-gathers the last dim."""
    return x if _skip(group) else _Scatter.apply(x, x.dim() - 1, group)


def gather_from_tp_last_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[..., N/t] -> [..., N]: fwd all-gathers the last dim; bwd keeps chunk r of the grad."""
    return gather_along_dim(x, -1, group, grad_is_partial=False)


def gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup, grad_is_partial: bool = True) -> torch.Tensor:
    """fwd: [x_0 | ... | x_{t-1}] along ``dim``; bwd: chunk_r(Σ_r g_r) (reduce-scatter) with
    ``grad_is_partial``, else chunk_r(g). (Context parallelism gathers keys/values with it.)"""
    return x if _skip(group) else _Gather.apply(x, dim % x.dim(), group, grad_is_partial)


def _tokens(x: torch.Tensor, t: int, what: str) -> torch.Tensor:
    """x [B, S, ...] viewed as [B·S, ...] (a view for contiguous x), after checking S splits t ways."""
    if x.dim() < 2:
        raise ValueError(f"{what}: expected [batch, seq, ...], got shape {tuple(x.shape)}")
    if x.shape[SEQ_DIM] % t != 0:
        raise ValueError(f"{what}: the sequence length {x.shape[SEQ_DIM]} (tensor of shape {tuple(x.shape)}) is not "
                         f"divisible by the group size {t}; choose a sequence length that is a multiple of the "
                         "tensor-parallel size")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def scatter_to_sp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[B, S, H] -> [B, S/t, H]: fwd keeps token chunk r; bwd all-gathers the tokens.

    For a replicated activation entering a sequence-parallel region (its grad shards are disjoint).
    """
    if _skip(group):
        return x
    t = group_size(group)
    out = _Scatter.apply(_tokens(x, t, "scatter_to_sp"), 0, group)
    return out.view(x.shape[0], x.shape[1] // t, *x.shape[2:])


def gather_from_sp(x: torch.Tensor, group: ProcessGroup, grad_is_partial: bool = True) -> torch.Tensor:
    """[B, S/t, H] -> [B, S, H]: fwd all-gathers the tokens.

    bwd with ``grad_is_partial`` (the default: the consumer is a column-parallel linear, so each
    rank's grad is a partial sum over its output shard): dx = chunk_r(Σ_r g_r) (reduce-scatter).
    Otherwise (the consumer is replicated): dx = chunk_r(g).
    """
    if _skip(group):
        return x
    t = group_size(group)
    out = _Gather.apply(_tokens(x, 1, "gather_from_sp"), 0, group, grad_is_partial)
    return out.view(x.shape[0], x.shape[1] * t, *x.shape[2:])


def reduce_scatter_to_sp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[B, S, H] partial sums -> [B, S/t, H]: fwd y = chunk_r(Σ_r x_r) over the tokens
    (reduce-scatter); bwd all-gathers the tokens. The exit of a row-parallel linear under SP."""
    if _skip(group):
        return x
    t = group_size(group)
    out = _ReduceScatter.apply(_tokens(x, t, "reduce_scatter_to_sp"), 0, group)
    return out.view(x.shape[0], x.shape[1] // t, *x.shape[2:])


def all_to_all(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """fwd: split ``scatter_dim`` into t chunks, chunk j goes to rank j, received chunks are
    concatenated along ``gather_dim`` (e.g. [B, S/t, N, D] -> [B, S, N/t, D] with scatter 2, gather 1).
    bwd: the inverse all-to-all (scatter ``gather_dim``, gather ``scatter_dim``)."""
    return x if _skip(group) else _AllToAll.apply(x, scatter_dim, gather_dim, group)
