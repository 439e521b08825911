"""Box arithmetic: how a local tensor maps onto its global tensor.

A *box* is an axis-aligned block ``(offsets, shape)`` of a tensor. Every layout megacore uses (TP
row/column/vocab shards, fused QKV or gate/up shards, replicated KV heads, distributed-optimizer
flat ranges) maps a local tensor onto its global tensor as a set of *segments*::

    local[l0:l0+s0, l1:l1+s1, ...] == global[g0:g0+s0, g1:g1+s1, ...]

(``Segment(global_offsets=g, local_offsets=l, shape=s)``). A fused TP shard such as
``linear_fc1`` on TP rank r (local rows ``[gate_r; up_r]``) is simply two segments; nothing needs
the full tensor to be one contiguous block.

Segments are derived, in this order of preference, from

1. ``peek_meta(param).ckpt_view``: a :class:`CkptView` (explicit segments) or a :class:`LogicalView`
   (the global tensor seen through a reshape, e.g. fc1 as ``[2, F, H]`` sharded on dim 1);
2. ``peek_meta(param).tp_layout`` + ``peek_meta(param).tp_rank`` (set by megacore.parallel.tensor_parallel):
   the layout lists, per TP rank, the ``(global_start, length)`` runs along one dim that the local
   tensor concatenates;
3. ``peek_meta(param).global_shape`` + ``ParamMeta.shard`` (the fields
   ``megacore.models.init.materialize`` already uses): the shard function is *probed* with index
   tensors, one per dimension, which recovers the exact gather it performs;
4. nothing: the tensor is the whole global tensor (replicated).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megacore.checkpoint.errors import CheckpointError
from megacore.sharding import peek_meta

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """``local[local_offsets : +shape] == global[global_offsets : +shape]`` (per dim)."""

    global_offsets: Shape
    local_offsets: Shape
    shape: Shape


@dataclass
class CkptView:
    """Explicit description of a local tensor: its global shape and the segments it holds."""

    global_shape: Shape
    segments: list[Segment] = field(default_factory=list)


@dataclass
class LogicalView:
    """The global tensor reshaped to ``view_shape`` is sharded as one box in that view.

    ``local_view_shape`` is the box's shape, ``view_offsets`` its offsets; the local tensor is that
    box reshaped to the parameter's shape. Example, gated fc1 (global ``[2F, H]``) on TP rank r of
    t: ``LogicalView((2F, H), (2, F, H), (2, F//t, H), (0, r*F//t, 0))``.
    """

    global_shape: Shape
    view_shape: Shape
    local_view_shape: Shape
    view_offsets: Shape

    def shard_fn(self, local_shape: Shape) -> Callable[[torch.Tensor], torch.Tensor]:
        sl = tuple(slice(o, o + s) for o, s in zip(self.view_offsets, self.local_view_shape))
        return lambda full: full.reshape(self.view_shape)[sl].reshape(local_shape)


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def slices(offsets: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, shape))


def intersect(a_off: Sequence[int], a_shape: Sequence[int], b_off: Sequence[int],
              b_shape: Sequence[int]) -> Optional[tuple[Shape, Shape]]:
    """The common box of two boxes, or None when they do not overlap (0-d boxes always overlap)."""
    off, shp = [], []
    for ao, asz, bo, bsz in zip(a_off, a_shape, b_off, b_shape):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        off.append(lo)
        shp.append(hi - lo)
    return tuple(off), tuple(shp)


def subtract(a_off: Sequence[int], a_shape: Sequence[int], b_off: Sequence[int],
             b_shape: Sequence[int]) -> list[tuple[Shape, Shape]]:
    """Disjoint boxes covering box A minus box B (A itself when they do not overlap; [] when B covers A)."""
    inter = intersect(a_off, a_shape, b_off, b_shape)
    if inter is None:
        return [(tuple(a_off), tuple(a_shape))]
    i_off, i_shape = inter
    cur_off, cur_shape = list(a_off), list(a_shape)
    out: list[tuple[Shape, Shape]] = []
    for d in range(len(cur_off)):
        lo, hi = i_off[d], i_off[d] + i_shape[d]
        a_lo, a_hi = cur_off[d], cur_off[d] + cur_shape[d]
        if a_lo < lo:
            out.append((tuple(cur_off[:d] + [a_lo] + cur_off[d + 1:]), tuple(cur_shape[:d] + [lo - a_lo] + cur_shape[d + 1:])))
        if hi < a_hi:
            out.append((tuple(cur_off[:d] + [hi] + cur_off[d + 1:]), tuple(cur_shape[:d] + [a_hi - hi] + cur_shape[d + 1:])))
        cur_off[d], cur_shape[d] = lo, hi - lo
    return out


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[Shape, Shape]]:
    """Split the C-order flat range ``[start, stop)`` of a tensor of ``shape`` into boxes.

    Returned in flat order; each box is itself contiguous in that order, so the flat data of the
    range is the concatenation of the boxes' flattened contents. At most ``2·ndim - 1`` boxes.
    """
    shape = tuple(int(s) for s in shape)
    if not 0 <= start <= stop <= numel(shape):
        raise ValueError(f"flat range [{start}, {stop}) is outside a tensor of shape {shape}")
    if start == stop:
        return []
    if len(shape) == 0:
        return [((), ())]
    inner_shape = shape[1:]
    inner = numel(inner_shape)
    r0, c0 = divmod(start, inner)
    r1, c1 = divmod(stop, inner)
    rest = (0,) * len(inner_shape)
    if r0 == r1:  # within one row
        return [((r0,) + o, (1,) + s) for o, s in flat_range_boxes(inner_shape, c0, c1)]
    out: list[tuple[Shape, Shape]] = []
    if c0:
        out += [((r0,) + o, (1,) + s) for o, s in flat_range_boxes(inner_shape, c0, inner)]
        r0 += 1
    if r1 > r0:
        out.append(((r0,) + rest, (r1 - r0,) + inner_shape))
    if c1:
        out += [((r1,) + o, (1,) + s) for o, s in flat_range_boxes(inner_shape, 0, c1)]
    return out


def _runs(index_map: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive global indices: [(global_start, local_start, length)]."""
    values = index_map.tolist()
    runs: list[tuple[int, int, int]] = []
    for local, g in enumerate(values):
        if runs and runs[-1][0] + runs[-1][2] == g:
            gs, ls, n = runs[-1]
            runs[-1] = (gs, ls, n + 1)
        else:
            runs.append((g, local, 1))
    return runs


def probe_segments(global_shape: Sequence[int], local_shape: Sequence[int],
                   shard_fn: Callable[[torch.Tensor], torch.Tensor], what: str = "tensor") -> list[Segment]:
    """Recover the segments of a gather-style ``shard_fn`` (full tensor -> local tensor).

    For each dim d the function is applied to an index tensor that holds the global index along d
    (broadcast, so no full-size copy unless the function makes one). If the result depends only on
    the local index along d for every d, the shard is the product of per-dim index maps, whose
    runs of consecutive indices give the segments. Anything else (a function that mixes dims or
    computes values) is refused with a request for an explicit ``ParamMeta.ckpt_view``.
    """
    global_shape, local_shape = tuple(int(s) for s in global_shape), tuple(int(s) for s in local_shape)
    if len(global_shape) != len(local_shape):
        raise CheckpointError(
            f"{what}: local shape {local_shape} and global shape {global_shape} have different ranks, so the "
            "shard cannot be inferred from ParamMeta.shard; set param_meta(param).ckpt_view "
            "(megacore.checkpoint.CkptView or LogicalView) on it")
    if len(global_shape) == 0:
        return [Segment((), (), ())]
    per_dim_runs = []
    for d, n in enumerate(global_shape):
        view = [1] * len(global_shape)
        view[d] = n
        probe = torch.arange(n, dtype=torch.int64).view(view).expand(global_shape)
        out = shard_fn(probe)
        if tuple(out.shape) != local_shape:
            raise CheckpointError(f"{what}: ParamMeta.shard gives shape {tuple(out.shape)} but the local "
                                  f"tensor has shape {local_shape}; fix the shard description or set param_meta(param).ckpt_view")
        index = [0] * len(global_shape)
        index[d] = slice(None)
        line = out[tuple(index)]
        if not torch.equal(out, line.view([-1 if i == d else 1 for i in range(len(global_shape))]).expand_as(out)):
            raise CheckpointError(f"{what}: ParamMeta.shard mixes dimensions (not a per-dim gather), so its "
                                  "shard cannot be described as boxes; set param_meta(param).ckpt_view explicitly")
        per_dim_runs.append(_runs(line))
    segments = []
    for combo in itertools.product(*per_dim_runs):
        segments.append(Segment(tuple(r[0] for r in combo), tuple(r[1] for r in combo), tuple(r[2] for r in combo)))
    return segments


def tensor_segments(tensor: torch.Tensor, what: str = "tensor") -> tuple[Shape, list[Segment]]:
    """(global shape, segments) of a parameter, from its ``ParamMeta`` (cached on it)."""
    local_shape = tuple(tensor.shape)
    view = peek_meta(tensor).ckpt_view
    layout = peek_meta(tensor).tp_layout
    shard_fn = peek_meta(tensor).shard if peek_meta(tensor).is_sharded else None
    source = (local_shape, id(view), id(layout), peek_meta(tensor).tp_rank, id(shard_fn),
              tuple(peek_meta(tensor).global_shape or ()))
    cached = getattr(tensor, "_megacore_ckpt_segments", None)
    if cached is not None and cached[0] == source:
        return cached[1], cached[2]
    if isinstance(view, CkptView):
        result = (tuple(view.global_shape), list(view.segments))
    elif isinstance(view, LogicalView):
        result = (tuple(view.global_shape),
                  probe_segments(view.global_shape, local_shape, view.shard_fn(local_shape), what))
    elif view is not None:
        raise CheckpointError(f"{what}: ParamMeta.ckpt_view must be a megacore.checkpoint.CkptView or LogicalView, "
                              f"got {type(view).__name__}")
    elif _has_tp_layout(tensor):
        result = (tuple(peek_meta(tensor).global_shape), tp_layout_segments(tensor, local_shape))
    elif shard_fn is not None:
        gshape = tuple((peek_meta(tensor).global_shape or local_shape))
        result = (gshape, probe_segments(gshape, local_shape, shard_fn, what))
    else:
        gshape = tuple((peek_meta(tensor).global_shape or local_shape))
        if gshape != local_shape:
            raise CheckpointError(f"{what}: has global shape {gshape} but local shape {local_shape} and no "
                                  "shard description; describe the shard (ParamMeta) or set param_meta(param).ckpt_view")
        result = (gshape, [Segment((0,) * len(gshape), (0,) * len(gshape), gshape)])
    check_segments(result[0], local_shape, result[1], what)
    try:
        tensor._megacore_ckpt_segments = (source, result[0], result[1])
    except (AttributeError, RuntimeError):  # plain tensors without a __dict__
        pass
    return result


def _has_tp_layout(tensor) -> bool:
    layout = peek_meta(tensor).tp_layout
    return (layout is not None and hasattr(layout, "per_rank") and hasattr(layout, "dim")
            and peek_meta(tensor).tp_rank is not None
            and peek_meta(tensor).global_shape is not None)


def tp_layout_segments(tensor, local_shape: Shape) -> list[Segment]:
    """Segments from a TPLayout: the local tensor concatenates runs ``(start, length)`` along ``dim``."""
    layout, rank = peek_meta(tensor).tp_layout, peek_meta(tensor).tp_rank
    dim, nd = layout.dim, len(local_shape)
    segments, local = [], 0
    for start, length in layout.per_rank[rank]:
        g_off, l_off, shape = [0] * nd, [0] * nd, list(local_shape)
        g_off[dim], l_off[dim], shape[dim] = int(start), local, int(length)
        segments.append(Segment(tuple(g_off), tuple(l_off), tuple(shape)))
        local += int(length)
    expert_slice = peek_meta(tensor).expert_slice
    if expert_slice is not None and dim != 0:  # an expert-parallel slice of the stack, split by ETP within
        segments = [Segment((s.global_offsets[0] + expert_slice[0], *s.global_offsets[1:]), s.local_offsets, s.shape)
                    for s in segments]
    return segments


def check_segments(global_shape: Shape, local_shape: Shape, segments: list[Segment], what: str) -> None:
    """Segments must lie inside both tensors and tile the local tensor exactly."""
    covered = 0
    for s in segments:
        for g, l, n, gd, ld in zip(s.global_offsets, s.local_offsets, s.shape, global_shape, local_shape):
            if g < 0 or l < 0 or g + n > gd or l + n > ld:
                raise CheckpointError(f"{what}: segment {s} lies outside global {global_shape} / local {local_shape}")
        covered += numel(s.shape)
    if covered != numel(local_shape):
        raise CheckpointError(f"{what}: segments cover {covered} elements but the local tensor has "
                              f"{numel(local_shape)}; the view description is wrong")
