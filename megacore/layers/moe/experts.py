"""The expert MLPs of an MoE layer, as stacked weights, run one expert after another.

``linear_fc1`` [E, 2F, H] holds each expert's ``[gate; up]`` rows (F each; [F, H] for ungated
activations), ``linear_fc2`` [E, H, F]: the dense ``MLP``'s layout with an expert dimension in front.

Dispatch: the T·k (token, slot) assignments are sorted by expert; expert e multiplies the
contiguous run of tokens assigned to it, and each output row, scaled by its router weight, is
added back to its token. The run lengths are read on the host (one device sync per layer), so this
is the simple path, not the fast one (a grouped GEMM without the sync is future work). Under
expert parallelism (``megacore.parallel.expert_parallel``) this rank holds a contiguous slice of
the experts, and the sorted rows travel to their experts' ranks and back.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.mlp import ACTIVATION_FNS, gated_activation_reference
from megacore.sharding import mark_init


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
        self.num_experts = e      # in the whole model; this rank may hold a slice (expert parallelism)
        # Expert parallelism hands in the exchange (megacore.parallel.expert_parallel):
        # ``dispatch(experts, x_sorted, counts_per_expert)`` -> the expert outputs in the same order.
        self.dispatch: Optional[Callable] = None

    def expert_mlp(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        up = F.linear(x_TH, self.linear_fc1[e])
        act = gated_activation_reference(up, self.activation) if self.gated else ACTIVATION_FNS[self.activation](up)
        return F.linear(act, self.linear_fc2[e])

    def run_sorted(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by local expert, ``counts[e]`` rows for expert e -> their outputs, same order."""
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.expert_mlp(e, x_sorted[start:start + n]))
            start += n
        if not pieces:  # no rows here: keep the weights in the graph so every rank's backward reaches them
            return x_sorted.new_zeros(x_sorted.shape) + 0.0 * (self.linear_fc1.sum() + self.linear_fc2.sum())
        return torch.cat(pieces)

    def forward(self, hidden_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Σ over each token's k experts of weight · expert(token): [T, H] in the input's dtype."""
        k = experts_TK.shape[1]
        flat_experts = experts_TK.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)           # assignments grouped by expert
        token_of = order // k                                      # which token each sorted assignment is
        scale = weights_TK.reshape(-1)[order].to(hidden_TH.dtype).unsqueeze(-1)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        x_sorted = hidden_TH[token_of]
        if self.dispatch is None:
            y_sorted = self.run_sorted(x_sorted, counts.tolist())  # host sync
        else:
            y_sorted = self.dispatch(self, x_sorted, counts)
        return torch.zeros_like(hidden_TH).index_add(0, token_of, y_sorted * scale)
