"""The training loop's MoE pieces: its MoE layers, the per-step balance-loss sum that
``metrics.jsonl`` logs as ``moe_aux_loss``, and the step's end (``end_moe_step``): the expert load
summed over ranks, the aux-loss-free bias update and the load metrics. (Which layouts MoE runs in: the support table,
``megacore.config.support``.)"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def num_moe_layers(model_cfg) -> int:
    """MoE layers in the whole model: the layers with an MLP (a plain layer 'T', or '-' in a hybrid
    ``layer_pattern``) that ``is_moe_layer`` picks (``moe_first_k_dense``, ``moe_layer_freq``)."""
    return sum(kind in "T-" and model_cfg.is_moe_layer(i) for i, kind in enumerate(model_cfg.layer_kinds))


def moe_layers(chunks) -> list[nn.Module]:
    """Every MoELayer of this rank's chunks (found once, at setup), each stamped with ``step_row``:
    the global number of the layer that holds it (its row in ``end_moe_step``'s table)."""
    from megacore.layers.moe import MoELayer

    found = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                found.append(module)
            elif hasattr(module, "layer_number"):
                for inner in module.modules():
                    if isinstance(inner, MoELayer):
                        inner.step_row = module.layer_number
    return found


def aux_loss_sum(layers, device) -> Optional[torch.Tensor]:
    """Sum over ``layers`` of their mean load-balancing loss this step (a device scalar, not read);
    None for a dense model."""
    if not layers:
        return None
    means = [m for m in (layer.pop_aux_mean() for layer in layers) if m is not None]
    return torch.stack(means).sum() if means else torch.zeros((), device=device)


# ---------------------------------------------------------------------------- the step's expert load
@torch.no_grad()
def end_moe_step(layers, model_cfg, skipped=False, device=None) -> Optional[dict]:
    """After the optimizer step: sum the step's expert load over all ranks, move the expert biases,
    and return the load metrics (device scalars, unread; None for a dense model).

    Every rank fills a [num_layers, E + 2] table (zeros for the layers it does not hold): row l =
    MoE layer l's mean tokens per expert per forward this step, then its mean z-loss, then 1. ONE
    all-reduce over all ranks (no host read; every rank calls it, even a pipeline stage without MoE
    layers) sums it, so each row holds its layer's load summed over every rank of its pipeline stage
    (data-, context-, expert-, tensor-parallel), the z-losses summed, and how many ranks added them.

    **Aux-loss-free balancing** (DeepSeek-V3; ``model.moe_router_bias_update_rate`` r > 0): each
    layer's router bias moves by ``b_e += r · sign(mean_e' load_e' - load_e)``, unless the step was
    skipped (``skipped``: a bool or an unread 0-dim tensor). ``load`` is a multiple of the tokens
    per expert summed over the step's micro-batches and ranks (a mean over forwards, counted once
    per tensor-parallel rank holding the layer); sign() does not see a factor that is the same for
    every expert, so the update is the one of the plain sum. All replicas compute the same update
    from the same sums, so they stay identical without a broadcast.

    **Metrics** (``metrics.jsonl``): the load over all MoE layers, ``L_e = Σ_layers load_e``:
    ``moe_load_max`` = max_e L / mean_e L, ``moe_load_min`` = min_e L / mean_e L and
    ``moe_load_cv`` = std_e L / mean_e L (population std; 0 for even load); with the z-loss on,
    ``moe_z_loss``, its mean over layers and micro-batches. Ratios: the normalization of L cancels.
    """
    if num_moe_layers(model_cfg) == 0:
        return None
    num_experts = model_cfg.num_experts
    rows = [(getattr(layer, "step_row", i), layer.router) for i, layer in enumerate(layers)]
    if device is None:
        device = rows[0][1].weight.device if rows else torch.device("cpu")
    table = torch.zeros(model_cfg.num_layers, num_experts + 2, dtype=torch.float64, device=device)
    for row, router in rows:
        load, z = router.pop_step()
        if load is None:
            continue
        table[row, :num_experts] = load.to(table.dtype)
        if z is not None:
            table[row, num_experts] = z.to(table.dtype)
        table[row, num_experts + 1] = 1.0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    loads = table[:, :num_experts]
    for row, router in rows:
        if router.expert_bias is None:
            continue
        load = loads[row]
        delta = router.bias_update_rate * torch.sign(load.mean() - load)
        if isinstance(skipped, torch.Tensor):
            delta = torch.where(skipped.to(delta.device) != 0, 0.0, delta)
        elif skipped:
            continue
        router.expert_bias.add_(delta.to(router.expert_bias))
    total = loads.sum(dim=0)
    mean = total.mean()
    metrics = {"moe_load_max": total.max() / mean, "moe_load_min": total.min() / mean,
               "moe_load_cv": total.std(correction=0) / mean}
    if model_cfg.moe_z_loss_coeff > 0:
        ranks = table[:, num_experts + 1]
        held = ranks > 0
        metrics["moe_z_loss"] = (table[:, num_experts] / ranks.clamp_min(1)).sum() / held.sum().clamp_min(1)
    return metrics
