"""MoE layer: route each token to its top-k experts and sum their weighted outputs.

The load-balancing loss never changes the returned activations or the reported LM loss: it is
attached to the layer's output so that backpropagating the LM loss also backpropagates
``scale · (moe_aux_loss_coeff · aux + moe_z_loss_coeff · z)`` (``AttachAuxLoss``). ``scale`` makes
the per-micro-batch losses add up to the mean over the global batch: the trainer sets it to
1 / (micro-batches per step × data-parallel ranks) with :func:`set_aux_loss_scale`; a plain
``model(ids, labels=...).backward()`` uses 1. Training forwards add up their aux values for
:meth:`MoELayer.pop_aux_mean` (what the trainer logs as ``moe_aux_loss``).

Two strategies are handed in by the parallel code (``megacore.parallel.moe_parallel``); the layer
runs as on one device without them:

* ``token_shard``: when this rank holds only a shard of the micro-batch's tokens (sequence or context
  parallelism), the router still sees the whole micro-batch: ``token_shard.gather`` brings the
  ``g = token_shard.size`` ranks' tokens together in one-device order (backward: the sum of the ranks'
  partial gradients, reduce-scattered), every one of them routes it identically, and
  ``token_shard.local`` keeps this rank's rows of the decision for its own experts' pass. The routing
  and the balance loss are then those of one device; each of the g ranks attaches ``1/g`` of the
  balance loss, so the sum of their gradients counts it once. (``experts_in`` / ``experts_out``:
  which tokens the experts run here, when that is more than this rank's own: identities otherwise.)
* ``aux_log_share``: the fraction of the balance-loss value this rank reports, so that summing the
  reports over all ranks (the trainer does) counts every layer once per data-parallel replica:
  ``1 / (ranks computing the same routing)``.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.mlp import MLP
from megacore.layers.moe.experts import Experts
from megacore.layers.moe.router import TopKRouter
from megacore.sharding import mark_init


class AttachAuxLoss(torch.autograd.Function):
    """forward(x, aux, weight) = x;  backward: dx = dy, d aux = weight (so ∂(loss)/∂aux = weight)."""

    @staticmethod
    def forward(ctx, x, aux, weight: float):
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


class MoELayer(nn.Module):
    """Router + routed experts (+ an always-on shared expert)::

        out = Σ_k w_k · expert_k(x)  [+ g(x) · shared(x)],   g = sigmoid(x·w_g) when gated, else 1
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.router = TopKRouter(config)
        self.experts = Experts(config)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.moe_shared_expert_hidden_size is not None:
            self.shared_expert = MLP(config, ffn_size=config.moe_shared_expert_hidden_size)
            if config.moe_shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
                mark_init(self.shared_expert_gate.weight, "normal")
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff
        self.aux_loss_scale = 1.0
        # [Σ balance loss, forwards] of the training forwards since the last pop_aux_mean: a device
        # tensor updated in place, so a compiled layer neither syncs nor recompiles for it.
        self.register_buffer("aux_accumulator", torch.zeros(2), persistent=False)
        self.record_aux = True  # False while a forward's balance loss must not be logged
        self.token_shard = None  # see the module docstring (parallel code hands these in)
        self.aux_log_share = 1.0

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        shape = hidden_BSH.shape
        tokens = hidden_BSH.reshape(-1, shape[-1])
        shard = self.token_shard
        if shard is None:
            routing = self.router(hidden_BSH)
            out = self.experts(tokens, routing.weights_TK, routing.experts_TK, routing.capacity).view(shape)
        else:  # route the whole micro-batch, keep the rows of the tokens run here (module docstring)
            mine = shard.experts_in(hidden_BSH)
            routing = self.router(shard.gather(mine))
            weights_TK = shard.local(routing.weights_TK, mine.shape[0])
            experts_TK = shard.local(routing.experts_TK, mine.shape[0])
            out = self.experts(mine.reshape(-1, shape[-1]), weights_TK, experts_TK, routing.capacity)
            out = shard.experts_out(out.view(mine.shape))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_BSH)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_BSH)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():
            if self.record_aux:
                acc = self.aux_accumulator
                value = (routing.balance_loss.detach() * self.aux_log_share).to(acc.dtype)
                acc.add_(torch.stack([value, acc.new_ones(())]))
                self.router.record_step(routing)  # the step's expert load: megacore.training.moe
            loss = None
            if self.aux_loss_coeff > 0:
                loss = self.aux_loss_coeff * routing.balance_loss
            if self.z_loss_coeff > 0 and routing.z_loss is not None:
                z = self.z_loss_coeff * routing.z_loss
                loss = z if loss is None else loss + z
            if loss is not None:
                share = 1.0 if shard is None else 1.0 / shard.size
                out = AttachAuxLoss.apply(out, loss, self.aux_loss_scale * share)
        return out

    def pop_aux_mean(self) -> torch.Tensor:
        """Mean load-balancing loss of the training forwards since the last call (a device scalar,
        0 if there were none; times ``aux_log_share``), and start over. A recomputed forward repeats its value, so the mean
        is the same with or without activation recomputation."""
        total, count = self.aux_accumulator.unbind()
        mean = total / count.clamp(min=1)
        self.aux_accumulator.zero_()
        return mean

    @property
    def recompute_activation(self) -> bool:
        """Selective recomputation of the MLP activation, for the routed and the shared experts."""
        return self.experts.recompute_activation

    @recompute_activation.setter
    def recompute_activation(self, value: bool) -> None:
        self.experts.recompute_activation = value
        if self.shared_expert is not None:
            self.shared_expert.recompute_activation = value

    def reset_buffers(self) -> None:
        """Zero the accumulator (``megacore.models.init.materialize`` calls this after allocating)."""
        with torch.no_grad():
            self.aux_accumulator.zero_()

    def _apply(self, fn, recurse=True):
        # model.to(bf16) casts buffers too; the accumulator stays fp32 (a bf16 sum of ~2.0-sized
        # values would round the logged loss at the percent level).
        super()._apply(fn, recurse)
        self._buffers["aux_accumulator"] = self._buffers["aux_accumulator"].float()
        return self


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Weight of each forward's load-balancing loss in the objective (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = scale
