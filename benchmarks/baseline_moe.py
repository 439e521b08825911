"""A plain-PyTorch MoE feed-forward block: the baseline megacore's MoE speed is measured against.

Written the way a user would from torchtitan's recipe: softmax router, top-k with renormalized
weights, an argsort permutation of the (token, slot) assignments, ``torch._grouped_mm`` for the
gate/up and down projections of all experts at once, no host read of the per-expert counts, and a
scatter-add back to the tokens. No megacore code is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainMoE(nn.Module):
    def __init__(self, h: int, ffn: int, experts: int, top_k: int):
        super().__init__()
        self.top_k, self.experts = top_k, experts
        self.router = nn.Linear(h, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, h, ffn))
        self.w_up = nn.Parameter(torch.empty(experts, h, ffn))
        self.w_down = nn.Parameter(torch.empty(experts, ffn, h))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.histc(flat.float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        token = order // self.top_k
        xs = x[token]
        hidden = F.silu(torch._grouped_mm(xs, self.w_gate, offs=offs)) * torch._grouped_mm(xs, self.w_up, offs=offs)
        ys = torch._grouped_mm(hidden, self.w_down, offs=offs) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, ys)
        return out.view(shape)
