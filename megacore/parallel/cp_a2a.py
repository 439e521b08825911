"""All-to-all context parallelism (Ulysses): heads scattered, sequence gathered, around attention.

Among the a ranks of an all-to-all group, each holding the load-balanced split of its sequence
(``megacore.parallel.context_parallel``: rank j holds chunks j and 2a-1-j of 2a, or of the
group's part of the sequence under ``a2a+ring``) for all local heads H:

    q, k, v [B, n, H, D]  --all-to-all-->  [B, a·n, H/a, D]   (every token of the group, H/a heads)
    attention over the group's whole sequence, per head
    out [B, a·n, H/a, Dv]  --all-to-all-->  [B, n, H, Dv]

(``megacore.parallel.collectives.all_to_all``; its backward is the inverse exchange). The gathered
tokens arrive in rank order, [chunk 0 | chunk 2a-1 | chunk 1 | chunk 2a-2 | ...]; ``to_sorted`` puts
them in position order, [chunk 0 | chunk 1 | ... | chunk 2a-1], so the group's sequence is one
contiguous stretch (``a2a``: the whole sequence, attended with the model's own core attention and a
plain causal mask), or, under ``a2a+ring``, the super-chunks g and 2c'-1-g of a ring of c' = c/a
groups: exactly the load-balanced layout ring attention expects (``megacore.parallel.cp_ring``).

GQA: key/value heads are scattered like the query heads when their count Hkv divides by a (query
head h reads key head h·Hkv/H, which then lands on the same rank); with fewer key/value heads than
ranks (a divisible by Hkv) each is repeated a/Hkv times first, so every rank receives the one its
query heads read (the repeat's backward sums the copies' gradients). The support table checks both.

Cost per attention layer and direction: four all-to-alls (q, k, v, out) of 1/a of the tensors each;
memory O(S/c) per rank except the attention's own inputs, which hold a·n tokens of H/a heads.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.parallel import collectives as C


def to_sorted(x: torch.Tensor, a: int) -> torch.Tensor:
    """[B, a·2m, ...] in rank order (each rank's two chunks) -> position order (module doc)."""
    b, n = x.shape[:2]
    chunks = x.reshape(b, a, 2, n // (2 * a), *x.shape[2:])
    return torch.cat([chunks[:, :, 0], chunks[:, :, 1].flip(1)], dim=1).reshape(x.shape)


def from_sorted(x: torch.Tensor, a: int) -> torch.Tensor:
    """The inverse of ``to_sorted``."""
    b, n = x.shape[:2]
    chunks = x.reshape(b, 2 * a, n // (2 * a), *x.shape[2:])
    return torch.stack([chunks[:, :a], chunks[:, a:].flip(1)], dim=2).reshape(x.shape)


def repeat_kv_for(x_BSGD: torch.Tensor, a: int) -> torch.Tensor:
    """Key/value heads ready to scatter over ``a`` ranks: as they are when their count divides by a,
    else each repeated a/Hkv times (GQA with fewer key/value heads than ranks)."""
    g = x_BSGD.shape[2]
    if g % a == 0:
        return x_BSGD
    if a % g:
        raise ValueError(f"{g} key/value heads cannot be spread over an all-to-all group of {a} ranks; the "
                         f"number of key/value heads per tensor-parallel rank must divide by {a} or divide it")
    return x_BSGD.repeat_interleave(a // g, dim=2)


def gather_sequence(x_BSHD: torch.Tensor, group, a: int) -> torch.Tensor:
    """[B, n, H, D] -> [B, a·n, H/a, D] in position order."""
    return to_sorted(C.all_to_all(x_BSHD, group, scatter_dim=2, gather_dim=1), a)


def scatter_sequence(x_BSHD: torch.Tensor, group, a: int) -> torch.Tensor:
    """[B, a·n, H/a, D] in position order -> [B, n, H, D] (the inverse of ``gather_sequence``)."""
    return C.all_to_all(from_sorted(x_BSHD, a), group, scatter_dim=1, gather_dim=2)


class AllToAllAttention(nn.Module):
    """In place of a core attention: the all-to-all around ``inner`` (module doc). ``inner`` is the
    model's core attention (``a2a``: ``mask`` is then the group's [B, 1, a·n, a·n] mask in position
    order, or None for plain causal) or a ``RingAttention`` over the groups (``a2a+ring``: ``mask``
    is the lowest visible position of each of the group's tokens, [B, a·n], or None)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group
        self.size = C.group_size(group)

    @property
    def core(self) -> nn.Module:
        return getattr(self.inner, "core", self.inner)

    @property
    def recompute(self) -> bool:
        return self.inner.recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self.inner.recompute = value

    def forward(self, q, k, v, mask=None):
        a = self.size
        if q.shape[2] % a:
            raise ValueError(f"{q.shape[2]} attention heads per tensor-parallel rank cannot be scattered over an "
                             f"all-to-all group of {a} ranks; choose parallel.context (a2a) or "
                             "parallel.context_a2a_size (a2a+ring) dividing them")
        q, k, v = (gather_sequence(t, self.group, a) for t in (q, repeat_kv_for(k, a), repeat_kv_for(v, a)))
        return scatter_sequence(self.inner(q, k, v, mask), self.group, a)
