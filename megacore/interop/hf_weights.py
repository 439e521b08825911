"""Weight-name rules between megacore and Hugging Face checkpoints, and their exact transforms.

A ``Rule`` ties one megacore parameter to one or more HF tensors, with the two exact
(bit-preserving) transforms between them. Loading and saving are both driven by the same rule
list; each family adapter (``megacore.interop.families``) builds its list from the transforms
here: identity, transpose (Conv1D), vocab padding, the grouped q/k/v fusion, the [gate; up]
fusion and the per-expert stacking. Nothing here knows a family.

Fused QKV (megacore ``linear_qkv``, rows grouped per KV group g = 0..G-1)::

    [ q rows of the q_per_group heads of group g ][ k_g: D rows ][ v_g: D rows ]   for g in 0..G-1

HF keeps q_proj [Hq·D, h], k_proj [G·D, h], v_proj [G·D, h].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megacore.config import TransformerConfig

Tensors = list[torch.Tensor]
Transforms = tuple[Callable[[Tensors], torch.Tensor], Callable[[torch.Tensor], Tensors]]


@dataclass(frozen=True)
class Rule:
    """megacore parameter ``ours`` <-> HF tensors ``hf`` (full names, checkpoint prefix included);
    ``to_ours`` builds the parameter from the HF tensors, ``to_hf`` the HF tensors from it."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """q [Hq·D, *r], k/v [G·D, *r] -> grouped fused [(Hq+2G)·D, *r] (works for weights and biases)."""
    rest = q.shape[1:]
    parts = [t.reshape(num_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tensors:
    """Inverse of ``fuse_qkv``: grouped [(Hq+2G)·D, *r] -> [q [Hq·D, *r], k [G·D, *r], v [G·D, *r]]."""
    rest = fused.shape[1:]
    q_rows = num_heads // num_groups * head_dim
    grouped = fused.reshape(num_groups, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def identity() -> Transforms:
    """One HF tensor is the parameter as is."""
    return (lambda ts: ts[0]), (lambda t: [t])


def transposed() -> Transforms:
    """A Conv1D-style weight [in, out] <-> nn.Linear's [out, in]."""
    return (lambda ts: ts[0].t()), (lambda t: [t.t()])


def vocab_padded(padded: int, vocab: int) -> Transforms:
    """HF [V, h] <-> megacore [padded_V, h]; padding rows are zero and dropped on export."""
    return (lambda ts: F.pad(ts[0], (0, 0, 0, padded - ts[0].shape[0]))), (lambda t: [t[:vocab]])


def qkv(num_heads: int, num_groups: int, head_dim: int) -> Transforms:
    """Separate q, k, v tensors (weights or biases) <-> the grouped fused ``linear_qkv``."""
    return (lambda ts: fuse_qkv(*ts, num_groups)), (lambda t: split_qkv(t, num_heads, num_groups, head_dim))


def config_qkv(c: TransformerConfig) -> Transforms:
    """``qkv`` with the head counts of ``c``."""
    return qkv(c.num_attention_heads, c.num_kv_heads, c.head_dim)


def gate_up() -> Transforms:
    """HF gate [F, *r] and up [F, *r] <-> megacore ``linear_fc1`` [gate; up] [2F, *r]."""
    return (lambda ts: torch.cat(ts, dim=0)), (lambda t: list(t.chunk(2, dim=0)))


def experts_gate_up(num_experts: int) -> Transforms:
    """HF (gate_0, up_0, gate_1, up_1, ...) [F, h] each <-> megacore [E, 2F, h] ([gate; up] per expert)."""
    def to_ours(ts: Tensors) -> torch.Tensor:
        return torch.stack([torch.cat(ts[2 * e:2 * e + 2], dim=0) for e in range(num_experts)])

    def to_hf(t: torch.Tensor) -> Tensors:
        return [half for e in range(num_experts) for half in t[e].chunk(2, dim=0)]
    return to_ours, to_hf


def experts_stacked(num_experts: int) -> Transforms:
    """HF (w_0, w_1, ...) [a, b] each <-> megacore [E, a, b]."""
    return (lambda ts: torch.stack(ts)), (lambda t: [t[e] for e in range(num_experts)])


def same(pairs: list[tuple[str, str]]) -> list[Rule]:
    """Identity rules for (megacore name, HF name) pairs."""
    return [Rule(ours, (hf,), *identity()) for ours, hf in pairs]


def vocab_rule(ours: str, hf: str, c: TransformerConfig) -> Rule:
    """An embedding or output table, vocab-padded to ``c.padded_vocab_size`` rows."""
    return Rule(ours, (hf,), *vocab_padded(c.padded_vocab_size, c.vocab_size))


def output_rules(c: TransformerConfig, hf: str = "lm_head.weight") -> list[Rule]:
    """The untied output layer's rule; none when the embeddings are tied."""
    return [] if c.tie_embeddings else [vocab_rule("output_layer.weight", hf, c)]
