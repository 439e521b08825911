"""The training loop's MoE pieces: which layouts MoE runs in, its MoE layers, and the per-step
balance-loss sum that ``metrics.jsonl`` logs as ``moe_aux_loss``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megacore.config import ConfigError, RunConfig


def check_moe_layout(cfg: RunConfig) -> None:
    """Raise a ConfigError for the MoE / expert-parallel combinations this version cannot run."""
    p, experts = cfg.parallel, cfg.model.num_experts
    if p.expert > 1 and experts is None:
        raise ConfigError(f"parallel.expert={p.expert} splits MoE experts over ranks, but the model has none; set "
                          "model.num_experts or parallel.expert=1")
    if p.expert > 1 and experts % p.expert != 0:
        raise ConfigError(f"model.num_experts={experts} is not divisible by parallel.expert={p.expert}; "
                          "choose an expert-parallel size that divides the number of experts")
    if p.expert > 1 and p.fsdp:
        raise ConfigError("parallel.expert > 1 with parallel.fsdp=true is not supported; use "
                          "parallel.distributed_optimizer=true")
    if experts is not None and (p.tensor > 1 or p.context > 1):
        raise ConfigError(f"model.num_experts={experts} (MoE) runs with data and pipeline parallelism "
                          f"only for now, not with parallel.tensor={p.tensor} / parallel.context={p.context}; set "
                          "both to 1")
    if experts is not None and cfg.precision.fp8 is not None:
        raise ConfigError("precision.fp8 converts dense linears only; MoE expert weights have no fp8 path yet: set "
                          "precision.fp8=null for model.num_experts")


def num_moe_layers(model_cfg) -> int:
    """MoE layers in the whole model: every layer with an MLP (a plain layer 'T', or '-' in a hybrid
    ``layer_pattern``) when ``num_experts`` is set, else none."""
    if model_cfg.num_experts is None:
        return 0
    return sum(kind in "T-" for kind in model_cfg.layer_kinds)


def moe_layers(chunks) -> list[nn.Module]:
    """Every MoELayer of this rank's chunks (found once, at setup)."""
    from megacore.layers.moe import MoELayer

    return [m for c in chunks for m in c.modules() if isinstance(m, MoELayer)]


def aux_loss_sum(layers, device) -> Optional[torch.Tensor]:
    """Sum over ``layers`` of their mean load-balancing loss this step (a device scalar, not read);
    None for a dense model."""
    if not layers:
        return None
    means = [m for m in (layer.pop_aux_mean() for layer in layers) if m is not None]
    return torch.stack(means).sum() if means else torch.zeros((), device=device)
