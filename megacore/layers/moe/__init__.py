"""Mixture-of-experts MLP: a top-k router, the expert MLPs, and the layer that joins them."""

from megacore.layers.moe.experts import SequentialExperts
from megacore.layers.moe.layer import MoELayer, set_aux_loss_scale
from megacore.layers.moe.router import TopKRouter, load_balancing_loss

__all__ = ["MoELayer", "SequentialExperts", "TopKRouter", "load_balancing_loss", "set_aux_loss_scale"]
