"""Pre-norm transformer layer and the block (stack of layers + final norm), with recomputation.

Layer::  x = x + dropout(attn(norm1(x)));  x = x + dropout(mlp(norm2(x)))

(Hybrid stacks, ``model.layer_pattern``, use the single-mixer layers of ``megacore.layers.hybrid``.)

Layers live in an ``nn.ModuleDict`` keyed by their GLOBAL index, so a pipeline stage holding
layers 8..15 names its parameters exactly like the full model does (``decoder.layers.8...``):
checkpoints, Hugging Face export and deterministic init all key on those names.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from megacore.layers.rng import checkpoint

from megacore.config import RecomputeConfig, TransformerConfig
from megacore.layers.spec import LayerSpec


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int, spec: LayerSpec):
        super().__init__()
        self.layer_number = layer_number
        self.input_norm = spec.input_norm(config, config.hidden_size)
        self.self_attention = spec.self_attention(config, spec.core_attention)
        self.pre_mlp_norm = spec.pre_mlp_norm(config, config.hidden_size)
        self.mlp = spec.feed_forward(config, layer_number)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        # A strategy the parallel plan may hand in (parallel.tp_batch_chunks): ``chunked_forward(forward,
        # hidden, rotary, mask)`` runs ``forward`` on independent groups of sequences, so that one group's
        # TP collectives overlap another's compute (megacore.parallel.batch_chunks).
        self.chunked_forward: Optional[Callable] = None

    def forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        if self.chunked_forward is not None and kv_cache is None:
            return self.chunked_forward(self._forward, hidden_BSH, rotary, mask)
        return self._forward(hidden_BSH, rotary, mask, kv_cache)

    def _forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        normed_BSH = self.input_norm(hidden_BSH)
        if kv_cache is None:
            attn_BSH = self.self_attention(normed_BSH, rotary, mask)
        else:  # incremental decoding: kv_cache is this layer's LayerKVCache
            attn_BSH = self.self_attention(normed_BSH, rotary, mask, kv_cache=kv_cache)
        attn_BSH = self.hidden_dropout(attn_BSH)
        normed_BSH, hidden_BSH = add_then_norm(self.pre_mlp_norm, attn_BSH, hidden_BSH)
        return hidden_BSH + self.hidden_dropout(self.mlp(normed_BSH))


def add_then_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x): one fused kernel when the norm ``fuses_residual`` (RMSNorm)."""
    if getattr(norm, "fuses_residual", False):
        return norm(x, residual=residual)
    hidden = residual + x
    return norm(hidden), hidden


def build_layer(config: TransformerConfig, layer_number: int, spec: LayerSpec) -> nn.Module:
    """Layer ``layer_number``: a ``TransformerLayer``, or in a hybrid stack (``model.layer_pattern``)
    the single-mixer layer its pattern character names (``megacore.layers.hybrid``)."""
    kind = config.layer_kinds[layer_number]
    if kind == "T":
        return TransformerLayer(config, layer_number, spec)
    from megacore.layers.hybrid import HYBRID_LAYERS

    return HYBRID_LAYERS[kind](config, layer_number, spec)


class TransformerBlock(nn.Module):
    """Layers ``layer_numbers`` (global indices) and, when ``has_final_norm``, the final norm."""

    def __init__(self, config: TransformerConfig, spec: Optional[LayerSpec] = None,
                 layer_numbers: Optional[Iterable[int]] = None, has_final_norm: bool = True):
        super().__init__()
        spec = spec or LayerSpec()
        numbers = list(range(config.num_layers) if layer_numbers is None else layer_numbers)
        self.layers = nn.ModuleDict({str(i): build_layer(config, i, spec) for i in numbers})
        self.final_norm = spec.final_norm(config, config.hidden_size) if has_final_norm else None
        self.full_recompute_layers: set[int] = set()

    def configure_recompute(self, recompute: RecomputeConfig) -> None:
        """Full: checkpoint every ``every``-th layer whole. Selective: only core attention, the MLP
        activation and/or multi-latent attention's up-projections (with its attention), the
        activations that are large and cheap to recompute."""
        self.full_recompute_layers = set()
        selective = recompute.granularity == "selective"
        for layer in self.layers.values():
            attention = getattr(layer, "self_attention", None)
            core = getattr(attention, "core_attention", None)
            if core is not None and hasattr(core, "recompute"):
                core.recompute = selective and "core_attn" in recompute.modules
            if hasattr(attention, "recompute_up_proj"):
                attention.recompute_up_proj = selective and "mla_up_proj" in recompute.modules
            if hasattr(getattr(layer, "mlp", None), "recompute_activation"):
                layer.mlp.recompute_activation = selective and "mlp_act" in recompute.modules
            if recompute.granularity == "full" and layer.layer_number % recompute.every == 0:
                self.full_recompute_layers.add(layer.layer_number)

    def forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        for layer in self.layers.values():
            if kv_cache is not None:
                hidden_BSH = layer(hidden_BSH, rotary, mask, kv_cache=kv_cache.layer(layer.layer_number))
            elif self.training and layer.layer_number in self.full_recompute_layers:
                hidden_BSH = checkpoint(layer, hidden_BSH, rotary, mask)
            else:
                hidden_BSH = layer(hidden_BSH, rotary, mask)
        if self.final_norm is not None:
            hidden_BSH = self.final_norm(hidden_BSH)
        return hidden_BSH
