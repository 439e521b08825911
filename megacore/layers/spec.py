"""Declarative layer specs: which class builds each submodule of a transformer layer.

A model is assembled from a ``LayerSpec``, so a user swaps one submodule (their own attention,
norm or MLP) without forking the model::

    spec = LayerSpec(mlp=MyMLP)            # MyMLP(config) -> nn.Module, forward(hidden_BSH)
                                           # (``moe=`` likewise replaces the MoE block)
    model = GPTModel(config, layer_spec=spec)

Each entry is a callable ``(config) -> nn.Module``; the norms are ``(config, dim) -> nn.Module``,
``self_attention`` is ``(config, core_attention_cls) -> nn.Module`` (by default ``SelfAttention``, or
``MultiLatentAttention`` when ``model.multi_latent_attention``).
Keep the attribute names of the default modules (``linear_qkv``, ``linear_fc1``, ...) if you want
tensor parallelism and Hugging Face interop to recognise your replacement's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from megacore.layers.attention import CoreAttention, SelfAttention
from megacore.layers.mlp import MLP
from megacore.layers.norm import build_norm


def build_self_attention(config, core_attention_cls=CoreAttention) -> nn.Module:
    """The attention block: ``MultiLatentAttention`` when ``config.multi_latent_attention``, else
    ``SelfAttention`` (fused grouped QKV); both with ``core_attention_cls`` as their core."""
    if config.multi_latent_attention:
        from megacore.layers.mla import MultiLatentAttention

        return MultiLatentAttention(config, core_attention_cls)
    return SelfAttention(config, core_attention_cls)


def build_moe(config) -> nn.Module:
    from megacore.layers.moe import MoELayer

    return MoELayer(config)


@dataclass
class LayerSpec:
    input_norm: Callable = build_norm
    self_attention: Callable = build_self_attention   # (config, core_attention_cls) -> nn.Module
    core_attention: Callable = CoreAttention
    pre_mlp_norm: Callable = build_norm
    mlp: Callable = MLP          # the dense feed-forward block
    moe: Callable = build_moe    # the layers ``config.is_moe_layer`` picks (model.num_experts set)
    final_norm: Callable = build_norm

    def feed_forward(self, config, layer_number: int) -> nn.Module:
        """Layer ``layer_number``'s feed-forward block: ``moe`` where the config puts an MoE layer
        (``num_experts``, ``moe_first_k_dense``, ``moe_layer_freq``), else ``mlp``."""
        return self.moe(config) if config.is_moe_layer(layer_number) else self.mlp(config)
