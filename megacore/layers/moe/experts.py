"""The routed expert MLPs of an MoE layer, as stacked weights, and the token permutation around them.

``linear_fc1`` [E, 2F, H] holds each expert's ``[gate; up]`` rows (F each; [F, H] for ungated
activations), ``linear_fc2`` [E, H, F]: the dense ``MLP``'s layout with an expert dimension in front.

Forward, for T tokens each sent to k experts (``experts_TK``, weights ``weights_TK``)::

    permute    the T·k (token, slot) assignments are sorted by expert (a stable argsort); row j of
               x_sorted is the token of the j-th assignment, ends[e] = Σ_{e' <= e} count[e']
    experts    y_sorted = fc2_e(act(fc1_e(x_sorted))) per expert group (``grouped_gemm``)
    unpermute  out[t] = Σ_s weights[t, s] · y[assignment (t, s)]

Nothing here reads a count on the host on the grouped path: the counts come from a scatter-add, the
group ends stay on the device, and the gathers move rows by a permutation. Gathering ``x_sorted``
from the k-fold expanded tokens (not ``hidden[token]``) and summing the k slots in order keep the
backward free of atomic index-adds, so a run repeats bit for bit.

Dropped assignments (a capacity, ``megacore.layers.moe.router``) carry the expert index E: they sort
after every real expert, no GEMM group covers them, and their outputs are masked to zero. With
``pad_to_capacity`` every expert instead computes exactly ``capacity`` rows (empty slots are zero
rows): fixed shapes, the layout a sync-free exchange needs.

Expert parallelism (``megacore.parallel.expert_parallel``) hands in ``dispatch``: this rank then
holds a contiguous slice of the experts, and the sorted rows travel to their experts' ranks and back.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.mlp import mlp_activation
from megacore.layers.rng import checkpoint
from megacore.layers.moe.grouped_gemm import grouped_linear, grouped_linear_reference, grouped_mm_available
from megacore.sharding import mark_init


class Experts(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.add_bias_linear:
            raise ValueError("MoE experts have no biases; set model.add_bias_linear=false with model.num_experts")
        e, h, f = config.num_experts, config.hidden_size, config.moe_ffn_size
        self.activation = config.activation
        self.gated = config.gated_mlp
        self.backend = config.moe_experts_backend
        self.may_drop = config.moe_capacity_factor is not None  # the router may drop assignments
        self.linear_fc1 = mark_init(nn.Parameter(torch.empty(e, 2 * f if self.gated else f, h)), "normal")
        self.linear_fc2 = mark_init(nn.Parameter(torch.empty(e, h, f)), "scaled_normal")
        self.num_experts = e      # in the whole model; this rank may hold a slice (expert parallelism)
        # Expert parallelism hands in the exchange (megacore.parallel.expert_parallel):
        # ``dispatch(experts, x_sorted, counts_per_expert)`` -> the expert outputs in the same order
        # (rows past counts_per_expert.sum(), the dropped assignments, may hold anything).
        self.dispatch: Optional[Callable] = None
        # ... and, for a fixed capacity, ``dispatch_padded(experts, x_slots [E·C, H], C)``: every
        # expert's C slots in expert order -> their outputs, exchanged without reading counts.
        self.dispatch_padded: Optional[Callable] = None
        # Selective recomputation (recompute.modules=[mlp_act]): keep fc1's output only.
        self.recompute_activation = False
        # Expert tensor parallelism hands in ``tensor_split``: this rank holds a slice of every
        # expert's hidden units, ``enter(x)`` before fc1 and ``exit(y)`` after fc2 (the partial
        # outputs summed over the ranks sharing the experts).
        self.tensor_split = None
        # A faster grouped GEMM handed in from outside (``megacore.precision.fp8_grouped`` under
        # precision.fp8): ``grouped_matmul(x, weight, ends)`` -> y, or None where it cannot run.
        self.grouped_matmul: Optional[Callable] = None

    # ------------------------------------------------------------------ the GEMMs
    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.backend == "reference":
            return False
        available = grouped_mm_available(x, self.linear_fc1) and grouped_mm_available(x, self.linear_fc2)
        if self.backend == "grouped_mm" and not available:
            raise RuntimeError(
                f"model.moe_experts_backend='grouped_mm' cannot run {x.dtype} on {x.device.type} with torch "
                f"{torch.__version__} (it needs torch._grouped_mm, bf16/fp32 on CPU or bf16 on Hopper-class "
                "CUDA with widths divisible by 8); set model.moe_experts_backend='auto' to fall back to the loop")
        return available

    def compute(self, x_sorted: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert, expert e owning rows up to ``ends[e]`` (int32, device) ->
        their outputs in the same order; rows past ``ends[-1]`` come out unspecified."""
        split = self.tensor_split
        up = self._linear(x_sorted if split is None else split.enter(x_sorted), self.linear_fc1, ends)
        if self.recompute_activation and self.training and torch.is_grad_enabled():
            act = checkpoint(mlp_activation, up, self.activation, self.gated)
        else:
            act = mlp_activation(up, self.activation, self.gated)
        y = self._linear(act, self.linear_fc2, ends)
        return y if split is None else split.exit(y)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        if self.grouped_matmul is not None:
            y = self.grouped_matmul(x, weight, ends)
            if y is not None:
                return y
        linear = grouped_linear if self.use_grouped(x) else grouped_linear_reference
        return linear(x, weight, ends)

    def run_sorted(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``compute`` with the per-expert counts given on the host (the exchange of expert
        parallelism has read them already)."""
        ends = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        return self.compute(x_sorted, ends)

    # ------------------------------------------------------------------ permutation
    def forward(self, hidden_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                capacity: Optional[int] = None) -> torch.Tensor:
        """Σ over each token's k experts of weight · expert(token): [T, H] in the input's dtype.
        ``capacity`` (with ``pad_to_capacity``): every expert computes exactly that many rows."""
        tokens, k = experts_TK.shape
        e = self.num_experts
        flat = experts_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)                     # assignments grouped by expert
        counts = torch.zeros(e + 1, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))[:e]                       # index e: dropped, not counted
        x_sorted = hidden_TH.unsqueeze(1).expand(tokens, k, hidden_TH.shape[-1]).reshape(tokens * k, -1)[order]
        kept = torch.arange(tokens * k, device=flat.device) < counts.sum()
        if self.may_drop:  # the GEMMs leave rows past the last group unwritten, their input gradient too:
            x_sorted = torch.where(kept.unsqueeze(-1), x_sorted, 0)  # this where gives those rows a zero one
        if capacity is not None and (self.dispatch is None or self.dispatch_padded is not None):
            y_sorted = self._padded(x_sorted, flat[order], counts, capacity)
        elif self.dispatch is not None:
            y_sorted = self.dispatch(self, x_sorted, counts)
        else:
            y_sorted = self.compute(x_sorted, counts.cumsum(0).to(torch.int32))
        # Rows past the last group are dropped assignments: zero, whatever the GEMM left there.
        y_sorted = torch.where(kept.unsqueeze(-1), y_sorted, 0)
        y_TKH = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(tokens, k, -1)
        return (y_TKH * weights_TK.to(y_TKH.dtype).unsqueeze(-1)).sum(dim=1)

    def _padded(self, x_sorted, expert_sorted, counts, capacity: int) -> torch.Tensor:
        """Each expert's rows placed in its ``capacity`` slots, computed as equal groups, read back."""
        e = self.num_experts
        rows = x_sorted.shape[0]
        starts = counts.cumsum(0) - counts
        real = expert_sorted < e
        expert_or_0 = torch.where(real, expert_sorted, 0)
        # position within its expert; dropped rows (and none else: the capacity was applied) go to a spare slot
        slot = torch.where(real, expert_or_0 * capacity + torch.arange(rows, device=x_sorted.device)
                           - starts[expert_or_0], e * capacity)
        padded = x_sorted.new_zeros((e * capacity + 1, x_sorted.shape[-1])).index_copy(0, slot, x_sorted)
        if self.dispatch_padded is not None:  # expert parallelism: equal splits, no host read
            y = self.dispatch_padded(self, padded[:e * capacity], capacity)
            return torch.cat([y, y.new_zeros((1, y.shape[-1]))])[slot]
        ends = torch.arange(1, e + 1, device=x_sorted.device, dtype=torch.int32) * capacity
        return self.compute(padded, ends)[slot]
