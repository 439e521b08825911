"""The training loop's MoE pieces: its MoE layers, and the per-step balance-loss sum that
``metrics.jsonl`` logs as ``moe_aux_loss``. (Which layouts MoE runs in: the support table,
``megacore.config.support``.)"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def num_moe_layers(model_cfg) -> int:
    """MoE layers in the whole model: the layers with an MLP (a plain layer 'T', or '-' in a hybrid
    ``layer_pattern``) that ``is_moe_layer`` picks (``moe_first_k_dense``, ``moe_layer_freq``)."""
    return sum(kind in "T-" and model_cfg.is_moe_layer(i) for i, kind in enumerate(model_cfg.layer_kinds))


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
