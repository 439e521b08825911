"""Top-k token router with the load-balancing loss.

For tokens x [T, H] and router weight W [E, H]::

    p = softmax(x·Wᵀ) in fp32            [T, E]
    experts, w = top-k of p per token    [T, k]  (w renormalized to sum 1 when norm_topk)

Load-balancing loss (Switch Transformer, as Mixtral trains with it), over the T tokens routed here::

    aux = E · Σ_e f_e · P_e,   f_e = (# of the T·k assignments that go to e) / T,   P_e = mean_t p[t, e]

It equals k when routing is perfectly uniform and grows as tokens crowd onto few experts. Its
gradient reaches W only through P (f counts discrete choices).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.sharding import mark_init


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """E · Σ_e f_e · P_e (see the module docstring); a scalar in the dtype of ``probs_TE``."""
    num_experts, tokens = probs_TE.shape[-1], probs_TE.shape[0]
    if tokens == 0:  # nothing routed, nothing unbalanced (and no 0/0)
        return probs_TE.sum() * 0.0
    counts = torch.zeros(num_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts.index_add_(0, experts_TK.reshape(-1), torch.ones(experts_TK.numel(), device=probs_TE.device,
                                                            dtype=probs_TE.dtype))
    return num_experts * (counts / max(tokens, 1) * probs_TE.mean(dim=0)).sum()


class Routing(NamedTuple):
    """What the router decides for T tokens (fp32 weights; fp64 for fp64 input)."""

    weights_TK: torch.Tensor          # each token's k expert weights (0 for a dropped assignment)
    experts_TK: torch.Tensor          # int64 expert indices; num_experts marks a dropped assignment
    balance_loss: torch.Tensor        # load-balancing loss, unweighted (a scalar)
    z_loss: Optional[torch.Tensor]    # router z-loss, unweighted; None when model.moe_z_loss_coeff is 0
    tokens_per_expert: torch.Tensor   # [E] assignments per expert before any drop (detached)
    capacity: Optional[int] = None    # rows per expert when model.moe_pad_to_capacity, else None


class TopKRouter(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.norm_topk = config.moe_router_norm_topk
        self.weight = mark_init(nn.Parameter(torch.empty(config.num_experts, config.hidden_size)), "normal")

    def forward(self, hidden_BSH: torch.Tensor) -> Routing:
        """hidden [B, S, H] -> the ``Routing`` of its T = B·S tokens (in that order)."""
        hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        # fp32 at least: bf16 probabilities would tie and flip top-k choices.
        probs = torch.softmax(F.linear(hidden_TH, self.weight), dim=-1,
                              dtype=torch.promote_types(hidden_TH.dtype, torch.float32))
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.zeros(probs.shape[-1], dtype=probs.dtype, device=probs.device).scatter_add_(
            0, experts.reshape(-1), torch.ones_like(experts.reshape(-1), dtype=probs.dtype))
        return Routing(weights, experts, load_balancing_loss(probs, experts), None, counts)
