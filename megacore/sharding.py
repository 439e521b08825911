"""How a local parameter relates to the one-device model: one typed description per parameter.

The invariant (DESIGN.md): the same seed gives the same global model in every layout, each rank
holding slices of it. Every parameter therefore carries a :class:`ParamMeta` (``param_meta(p)``),
written by whoever makes or splits it and read by whoever needs the global view:

=====================  =========================================================  =====================
field                  meaning                                                    written by / read by
=====================  =========================================================  =====================
``init``               init kind (normal, scaled_normal, ones, zeros, ...)        layers / init
``global_name``        its name in the one-device model when that differs (the    pipeline / init,
                       last stage's copy of a tied embedding)                     checkpoint
``shared_duplicate``   a copy of a parameter counted elsewhere (that tied copy)   pipeline / grad norm
``global_shape``       the full tensor's shape, when this is a slice of it        TP, EP / init, ckpt
``tp_layout``,         which global rows of one dim each TP rank holds            TP plan / init, ckpt,
``tp_rank``            (a :class:`TPLayout`), and this rank                       grad norm, gathers
``expert_slice``       ``(start, stop)`` of the expert stack this rank holds      EP / init, ckpt, DDP
``sequence_parallel``  replicated over TP, gradient partial per token chunk        SP plan / grad sync
``tp_grad_sum``        how its gradient is summed over TP ("all", "replicas")     TP plan / grad sync
``shard_fn``           full -> local for a custom shard no layout describes        user / init, ckpt
``ckpt_view``          an explicit checkpoint view (megacore.checkpoint.boxes)    user / checkpoint
=====================  =========================================================  =====================

``shard(full)`` turns the one-device tensor into this rank's local one (``materialize`` fills
every shard that way). The model side writes only ``init`` and ``global_name``; the rest is
written by the parallel plans.

A :class:`TPLayout` lists, per TP rank, segments ``(global_start, length)`` along one dim; the
local tensor is their concatenation. Plain splits are one segment per rank; fused weights are
several (``linear_fc1`` rank r = ``[gate_r; up_r]``); grouped QKV with more TP ranks than KV
groups holds a KV group's k/v rows on several ranks (``replicated``): their gradients are summed
over those ranks (``megacore.parallel.grad_sync``) and counted once in the grad norm
(``owned_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

Segments = tuple[tuple[int, int], ...]


@dataclass
class TPLayout:
    """Rank r holds global rows ``per_rank[r]`` (segments ``(start, length)``) of dim ``dim``."""

    dim: int
    global_size: int
    per_rank: tuple[Segments, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, dim: int, n: int, t: int) -> "TPLayout":
        return cls.fused(dim, [n], t)

    @classmethod
    def fused(cls, dim: int, parts: Sequence[int], t: int) -> "TPLayout":
        """Global dim = concatenation of ``parts``; each part is split evenly, rank r = [part_0 chunk r; ...]."""
        for p in parts:
            if p % t != 0:
                raise ValueError(f"a fused part of size {p} (of {list(parts)}) is not divisible by tensor={t}")
        offsets = [sum(parts[:i]) for i in range(len(parts))]
        per_rank = tuple(tuple((off + r * (p // t), p // t) for off, p in zip(offsets, parts)) for r in range(t))
        return cls(dim, sum(parts), per_rank)

    @classmethod
    def grouped_qkv(cls, num_heads: int, num_kv: int, head_dim: int, t: int) -> "TPLayout":
        """Rows of the grouped fused QKV weight (per KV group: [q heads][k][v]) across t ranks.

        ``num_kv % t == 0``: each rank gets ``num_kv / t`` whole groups (one contiguous block).
        ``t % num_kv == 0``: each KV group is replicated on ``rep = t / num_kv`` neighbouring ranks
        and its ``q_per_group`` query heads are split among them: rank r = g·rep + j holds query
        heads ``j·q/rep .. (j+1)·q/rep`` of group g, then k_g and v_g. Its local layout is again
        one group of ``q_per_group / rep`` heads, and its heads are global heads
        ``r·H/t .. (r+1)·H/t``, so the row-parallel output projection splits contiguously.
        """
        qpg = num_heads // num_kv
        rows = (qpg + 2) * head_dim
        if num_kv % t == 0:
            return cls.contiguous(0, num_kv * rows, t)
        if t % num_kv != 0 or qpg % (t // num_kv) != 0:
            raise ValueError(f"num_query_groups={num_kv}, num_attention_heads={num_heads} cannot be split over "
                             f"tensor={t}: need num_query_groups % tensor == 0, or tensor % num_query_groups == 0 "
                             "and num_attention_heads % tensor == 0")
        rep = t // num_kv
        qh = qpg // rep
        per_rank = []
        for r in range(t):
            g, j = divmod(r, rep)
            base = g * rows
            per_rank.append(((base + j * qh * head_dim, qh * head_dim), (base + qpg * head_dim, 2 * head_dim)))
        return cls(0, num_kv * rows, tuple(per_rank))

    # -- queries -------------------------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return len(self.per_rank)

    @property
    def local_size(self) -> int:
        return sum(n for _, n in self.per_rank[0])

    def holders(self) -> torch.Tensor:
        """[global_size] number of ranks holding each global row."""
        if "holders" not in self._cache:
            counts = torch.zeros(self.global_size, dtype=torch.int64)
            for segs in self.per_rank:
                for s, n in segs:
                    counts[s:s + n] += 1
            self._cache["holders"] = counts
        return self._cache["holders"]

    @property
    def replicated(self) -> bool:
        return bool((self.holders() > 1).any())

    def local_index(self, rank: int) -> torch.Tensor:
        """[local_size] global row of each local row."""
        return torch.cat([torch.arange(s, s + n) for s, n in self.per_rank[rank]])

    def owned_mask(self, rank: int) -> torch.Tensor:
        """[local_size] True for the local rows this rank counts as their owner (the lowest rank
        holding them), so a reduction over TP (e.g. a grad norm) counts replicated rows once."""
        first = torch.full((self.global_size,), -1, dtype=torch.int64)
        for r in reversed(range(self.tp_size)):
            first[self.local_index(r)] = r
        return first[self.local_index(rank)] == rank

    # -- shard / assemble -----------------------------------------------------------------------------
    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        if full.shape[self.dim] != self.global_size:
            raise ValueError(f"expected size {self.global_size} along dim {self.dim}, got shape {tuple(full.shape)}")
        parts = [full.narrow(self.dim, s, n) for s, n in self.per_rank[rank]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def assemble(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full tensor from every rank's local tensor (replicated rows taken from the last holder)."""
        shape = list(shards[0].shape)
        shape[self.dim] = self.global_size
        full = shards[0].new_empty(shape)
        for segs, shard in zip(self.per_rank, shards):
            local = 0
            for s, n in segs:
                full.narrow(self.dim, s, n).copy_(shard.narrow(self.dim, local, n))
                local += n
        return full


@dataclass
class ParamMeta:
    """See the module docstring."""

    init: Optional[str] = None
    global_name: Optional[str] = None
    shared_duplicate: bool = False
    global_shape: Optional[tuple[int, ...]] = None
    tp_layout: Optional[TPLayout] = None
    tp_rank: Optional[int] = None
    expert_slice: Optional[tuple[int, int]] = None
    sequence_parallel: bool = False
    tp_grad_sum: Optional[str] = None
    shard_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ckpt_view: Any = None

    @property
    def tp_dim(self) -> Optional[int]:
        """The dim split over TP, or None for a parameter replicated over TP."""
        return None if self.tp_layout is None else self.tp_layout.dim

    @property
    def is_sharded(self) -> bool:
        """This parameter is a slice of a larger (global) tensor, which ``shard`` cuts."""
        return self.global_shape is not None or self.shard_fn is not None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """The one-device tensor ``full`` -> this rank's local tensor (itself when not sharded)."""
        if self.shard_fn is not None:
            return self.shard_fn(full)
        if self.tp_layout is not None:
            full = self.tp_layout.shard(full, self.tp_rank)
        if self.expert_slice is not None:
            full = full[self.expert_slice[0]:self.expert_slice[1]]
        return full

    def local_copy(self) -> "ParamMeta":
        """The fields a replacement of this parameter keeps when it is sharded anew (its init kind,
        global name, duplicate flag), without any shard description."""
        return ParamMeta(init=self.init, global_name=self.global_name, shared_duplicate=self.shared_duplicate)


_ATTR = "_megacore_meta"  # the one attribute a parameter carries


def param_meta(param: torch.Tensor) -> ParamMeta:
    """``param``'s description, created empty on first use (then written in place)."""
    meta = param.__dict__.get(_ATTR)
    if meta is None:
        meta = ParamMeta()
        setattr(param, _ATTR, meta)
    return meta


def peek_meta(param: torch.Tensor) -> ParamMeta:
    """``param``'s description for reading: an empty one (not attached) when it has none."""
    return param.__dict__.get(_ATTR) or _EMPTY


_EMPTY = ParamMeta()


def mark_init(param: torch.Tensor, kind: str) -> torch.Tensor:
    """Declare ``param``'s init kind (see ``megacore.models.init``); returns it."""
    param_meta(param).init = kind
    return param
