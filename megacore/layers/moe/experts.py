"""The expert MLPs of an MoE layer, as stacked weights, run one expert after another.

``linear_fc1`` [E, 2F, H] holds each expert's ``[gate; up]`` rows (F each; [F, H] for ungated
activations), ``linear_fc2`` [E, H, F]: the dense ``MLP``'s layout with an expert dimension in front.

Dispatch: the T·k (token, slot) assignments are sorted by expert; expert e multiplies the
contiguous run of tokens assigned to it, and each output row, scaled by its router weight, is
added back to its token. The run lengths are read on the host (one device sync per layer), so this
is the simple path, not the fast one (a grouped GEMM without the sync is future work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.mlp import ACTIVATION_FNS, gated_activation_reference
from megacore.layers.norm import mark_init


class SequentialExperts(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.add_bias_linear:
            raise ValueError("MoE experts have no biases; set model.add_bias_linear=false with model.num_experts")
        e, h, f = config.num_experts, config.hidden_size, config.moe_ffn_size
        self.activation = config.activation
        self.gated = config.gated_mlp
        self.linear_fc1 = mark_init(nn.Parameter(torch.empty(e, 2 * f if self.gated else f, h)), "normal")
        self.linear_fc2 = mark_init(nn.Parameter(torch.empty(e, h, f)), "scaled_normal")

    def expert_mlp(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        up = F.linear(x_TH, self.linear_fc1[e])
        act = gated_activation_reference(up, self.activation) if self.gated else ACTIVATION_FNS[self.activation](up)
        return F.linear(act, self.linear_fc2[e])

    def forward(self, hidden_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Σ over each token's k experts of weight · expert(token): [T, H] in the input's dtype."""
        tokens, k = experts_TK.shape
        flat_experts = experts_TK.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)           # assignments grouped by expert
        token_of = order // k                                      # which token each sorted assignment is
        counts = torch.bincount(flat_experts, minlength=self.linear_fc1.shape[0]).tolist()  # host sync
        scale = weights_TK.reshape(-1)[order].to(hidden_TH.dtype).unsqueeze(-1)
        out = torch.zeros_like(hidden_TH)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]
            out.index_add_(0, rows, self.expert_mlp(e, hidden_TH[rows]) * scale[start:start + n])
            start += n
        return out
