"""Mixture-of-experts MLP: a top-k router, the routed expert MLPs (grouped GEMM), an optional shared
expert, and the layer that joins them."""

from megacore.layers.moe.experts import Experts
from megacore.layers.moe.layer import MoELayer, set_aux_loss_scale
from megacore.layers.moe.router import Routing, TopKRouter, load_balancing_loss

__all__ = ["Experts", "MoELayer", "Routing", "TopKRouter", "load_balancing_loss", "set_aux_loss_scale"]
