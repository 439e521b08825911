"""Top-k token router: scores, the top-k choice, and the capacity. (The balancing losses:
``megacore.layers.moe.balancing``.)

For tokens x [T, H] and router weight W [E, H], in fp32 at least (bf16 scores would tie and flip
choices)::

    logits = x·Wᵀ                                        [T, E]
    s      = softmax(logits)          (moe_router_score="softmax": Mixtral, Qwen)
           | sigmoid(logits)          (moe_router_score="sigmoid": DeepSeek-V3, each expert on its own)
    c      = s + b                    the choice score; b = ``expert_bias`` [E] (zeros at init; absent
                                      unless moe_router_expert_bias or moe_router_bias_update_rate > 0)
    [group limit, below: c outside the token's best groups becomes -inf]
    experts = the k largest c per token                  [T, k]
    w       = s[experts]              the chosen s, not c: the bias only chooses
    w      /= Σ_k w                   when moe_router_norm_topk
    w      *= moe_routed_scaling_factor

**Group-limited routing** (DeepSeek-V3, ``moe_router_num_groups`` G, ``moe_router_group_topk`` g):
the E experts form G groups of E/G consecutive experts; a group's score is the sum of its two
largest c (DeepSeek-V3's choice, on the biased scores like its reference code; DeepSeek-V2 took the
max instead; a group of one expert scores that expert). Each token keeps its g best groups and the
top-k runs over their experts only. Megatron-Core sums the top k/g per group, the same for
DeepSeek-V3 (8/4 = 2).

**Aux-loss-free balancing** (DeepSeek-V3): after each optimizer step the trainer moves b by
``rate · sign(mean load - load_e)`` (``megacore.training.moe``): an overloaded expert's bias falls.
The bias never reaches w, so it takes no gradient; it is a persistent fp32 buffer (checkpointed, and
kept fp32 when the model is cast to bf16). ``moe_router_expert_bias`` keeps it without moving it (an
imported DeepSeek-V3 checkpoint's ``e_score_correction_bias``).

**Capacity** (``moe_capacity_factor`` f; dropless when unset): each expert takes at most
``C = ceil(f · T · k / E)`` of this forward's assignments, those with the largest final weight w
(ties: the earlier token first); the others are dropped (expert index E, weight 0), so those tokens
get less (or none) of the routed output. A sort, no host read. With ``moe_pad_to_capacity`` the
routing carries C and every expert computes exactly C rows (``megacore.layers.moe.experts``).
``tokens_per_expert`` and the balancing losses count the assignments before the drop.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.moe.balancing import (aux_probs, expert_counts, global_balancing_loss, load_balancing_loss,
                                           router_z_loss, sequence_balancing_loss)
from megacore.sharding import mark_init

__all__ = ["Routing", "TopKRouter", "drop_over_capacity", "limit_to_groups", "load_balancing_loss"]


class Routing(NamedTuple):
    """What the router decides for T tokens (fp32 weights; fp64 for fp64 input)."""

    weights_TK: torch.Tensor          # each token's k expert weights (0 for a dropped assignment)
    experts_TK: torch.Tensor          # int64 expert indices; num_experts marks a dropped assignment
    balance_loss: torch.Tensor        # load-balancing loss, unweighted (a scalar)
    z_loss: Optional[torch.Tensor]    # router z-loss, unweighted; None when model.moe_z_loss_coeff is 0
    tokens_per_expert: torch.Tensor   # [E] assignments per expert before any drop (detached)
    capacity: Optional[int] = None    # rows per expert when model.moe_pad_to_capacity, else None


def limit_to_groups(choice_TE: torch.Tensor, num_groups: int, group_topk: int) -> torch.Tensor:
    """``choice_TE`` with every expert outside each token's ``group_topk`` best groups set to -inf
    (group score: the sum of the group's two largest entries; see the module docstring)."""
    tokens, num_experts = choice_TE.shape
    per_group = num_experts // num_groups
    grouped = choice_TE.view(tokens, num_groups, per_group)
    group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)          # [T, G]
    best = group_scores.topk(group_topk, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, num_experts)


def drop_over_capacity(weights_TK: torch.Tensor, experts_TK: torch.Tensor, capacity: int,
                       num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per expert, its ``capacity`` assignments of largest weight (ties: lower token first);
    the rest get expert ``num_experts`` and weight 0. Sort-based, no host read."""
    flat_e = experts_TK.reshape(-1)
    by_weight = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]  # by expert, then weight (desc)
    expert_sorted = flat_e[order]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_e.device).scatter_add_(
        0, flat_e, torch.ones_like(flat_e))
    starts = counts.cumsum(0) - counts
    rank_in_expert = torch.arange(flat_e.numel(), device=flat_e.device) - starts[expert_sorted]
    keep = torch.empty_like(flat_e, dtype=torch.bool).scatter_(0, order, rank_in_expert < capacity)
    keep = keep.view_as(experts_TK)
    return torch.where(keep, weights_TK, 0), torch.where(keep, experts_TK, num_experts)


class TopKRouter(nn.Module):
    """The router of one MoE layer (formulas: the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.moe_top_k
        self.norm_topk = config.moe_router_norm_topk
        self.score = config.moe_router_score
        self.scaling = config.moe_routed_scaling_factor
        self.num_groups, self.group_topk = config.moe_router_num_groups, config.moe_router_group_topk
        self.aux_loss_type = config.moe_aux_loss_type
        self.z_loss_on = config.moe_z_loss_coeff > 0
        self.capacity_factor = config.moe_capacity_factor
        self.pad_to_capacity = config.moe_pad_to_capacity
        self.bias_update_rate = config.moe_router_bias_update_rate
        self.weight = mark_init(nn.Parameter(torch.empty(config.num_experts, config.hidden_size)), "normal")
        if config.has_expert_bias:  # moe_router_expert_bias, or implied by a bias update rate > 0
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # Strategy from the composition root (megacore.compose), for moe_aux_loss_type="global_batch":
        # an all-reduce sum of a count tensor over the data-parallel ranks. None: this rank's counts.
        self.reduce_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # [Σ tokens per expert (E), Σ z-loss, forwards] of this step's training forwards: a device
        # tensor updated in place, so a compiled layer neither syncs nor recompiles for it.
        self.register_buffer("step_accumulator", torch.zeros(config.num_experts + 2), persistent=False)

    def _apply(self, fn, recurse=True):
        """Casts (``model.to(bf16)``) keep ``expert_bias`` fp32: its steps of ``rate`` would round
        away in bf16. Moves (device, ``to_empty``) apply as usual."""
        before = self.expert_bias
        super()._apply(fn, recurse)
        after = self.expert_bias
        if after is not None and after.dtype != torch.float32:
            kept = torch.empty_like(after, dtype=torch.float32) if before.is_meta or after.is_meta else before
            self.expert_bias = kept.to(after.device, torch.float32)
        self._buffers["step_accumulator"] = self._buffers["step_accumulator"].float()  # counts and sums
        return self

    def reset_buffers(self) -> None:
        """Zero ``expert_bias`` and the step accumulator (``megacore.models.init.materialize`` calls
        this on a fresh model)."""
        with torch.no_grad():
            self.step_accumulator.zero_()
            if self.expert_bias is not None:
                self.expert_bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_BSH: torch.Tensor) -> Routing:
        """hidden [B, S, H] -> the ``Routing`` of its T = B·S tokens (in that order)."""
        hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        dtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        logits = F.linear(hidden_TH, self.weight).to(dtype)
        scores = torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)
        choice = scores.detach()
        if self.expert_bias is not None:
            choice = choice + self.expert_bias.to(dtype)
        if self.num_groups is not None:
            choice = limit_to_groups(choice, self.num_groups, self.group_topk)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        counts = expert_counts(experts, self.num_experts, dtype)
        balance = self._balance_loss(aux_probs(scores, self.score), experts, counts, hidden_BSH.shape)
        z_loss = router_z_loss(logits) if self.z_loss_on else None
        capacity = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * hidden_TH.shape[0] * self.top_k / self.num_experts)
            weights, experts = drop_over_capacity(weights, experts, capacity, self.num_experts)
        return Routing(weights, experts, balance, z_loss, counts, capacity if self.pad_to_capacity else None)

    def _balance_loss(self, probs_TE, experts_TK, counts_E, shape) -> torch.Tensor:
        if self.aux_loss_type == "sequence" and len(shape) == 3:
            b, s = shape[0], shape[1]
            return sequence_balancing_loss(probs_TE.view(b, s, -1), experts_TK.view(b, s, -1))
        if (self.aux_loss_type == "global_batch" and self.reduce_counts is not None and self.training
                and torch.is_grad_enabled()):  # training forwards only: every DP rank runs them in step
            return global_balancing_loss(probs_TE, counts_E, self.top_k, self.reduce_counts)
        return load_balancing_loss(probs_TE, experts_TK)

    # ------------------------------------------------------------------ the step's load
    def record_step(self, routing: Routing) -> None:
        """Add a training forward's expert load (and z-loss) to this step's (``MoELayer`` calls it)."""
        acc = self.step_accumulator
        z = routing.z_loss.detach().to(acc.dtype).reshape(1) if routing.z_loss is not None else acc.new_zeros(1)
        acc.add_(torch.cat([routing.tokens_per_expert.detach().to(acc.dtype), z, acc.new_ones(1)]))

    def pop_step(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean tokens per expert [E], mean z-loss or None when the z-loss is off) over the training
        forwards since the last call (device tensors, not read; zeros if there were none), and start
        over. Means, not sums: a recomputed forward repeats its counts, and a mean does not change."""
        acc = self.step_accumulator
        forwards = acc[-1].clamp(min=1)
        load = acc[:self.num_experts] / forwards
        z = acc[self.num_experts] / forwards if self.z_loss_on else None
        acc.zero_()
        return load, z
