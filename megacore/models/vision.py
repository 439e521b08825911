"""A CLIP-style vision transformer (ViT), the image encoder of LLaVA.

    pixels [B, C, H, W] -> patches (conv, stride = patch) [B, P, h] -> [cls | patches] + positions
    -> pre-norm -> L pre-norm transformer layers (bidirectional attention) -> hidden states

The configuration is ``megacore.config.VisionConfig``. The layers are megacore's
``TransformerLayer`` on a ``TransformerConfig`` that describes CLIP's:
LayerNorm, biases on every linear, the non-gated MLP with ``quick_gelu``, no rotary embedding. The
attention mask is all-True, so every patch attends to every patch. ``forward`` returns the
hidden states after ``num_layers_used`` layers: LLaVA reads the second-to-last layer and drops the
class token.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.config import TransformerConfig, VisionConfig
from megacore.sharding import mark_init
from megacore.layers.transformer import TransformerBlock


def layer_config(config: VisionConfig) -> TransformerConfig:
    """The TransformerConfig of the encoder layers (sequence = class token + patches)."""
    return TransformerConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_attention_heads, ffn_hidden_size=config.intermediate_size, vocab_size=1,
        vocab_padding_multiple=1, seq_length=config.num_patches + 1, normalization="LayerNorm",
        norm_epsilon=config.norm_epsilon, activation=config.activation, position_embedding="none",
        add_qkv_bias=True, add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config.validate()
        h = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, h, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(h))
        self.position_embedding = nn.Embedding(config.num_patches + 1, h)
        for p in (self.patch_embedding.weight, self.class_embedding, self.position_embedding.weight):
            mark_init(p, "normal")
        self.pre_norm = nn.LayerNorm(h, eps=config.norm_epsilon)
        self.encoder = TransformerBlock(layer_config(config), has_final_norm=False)
        # Kept for checkpoint round trips: CLIP's pooled-output norm, which LLaVA does not use.
        self.post_norm = nn.LayerNorm(h, eps=config.norm_epsilon)

    def forward(self, pixels_BCHW: torch.Tensor, num_layers_used: int | None = None) -> torch.Tensor:
        """[B, C, H, W] -> hidden states [B, 1 + P, h] after ``num_layers_used`` layers (default all)."""
        c = self.config
        if pixels_BCHW.dim() != 4 or pixels_BCHW.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"pixel values must be [batch, {c.num_channels}, {c.image_size}, {c.image_size}], got "
                             f"{tuple(pixels_BCHW.shape)}; resize the images to vision.image_size")
        used = c.num_layers if num_layers_used is None else num_layers_used
        if not 0 <= used <= c.num_layers:
            raise ValueError(f"num_layers_used={used} is outside 0..{c.num_layers}")
        weight = self.patch_embedding.weight
        patches_BHP = self.patch_embedding(pixels_BCHW.to(weight.dtype)).flatten(2)
        patches_BPH = patches_BHP.transpose(1, 2)
        cls_B1H = self.class_embedding.expand(patches_BPH.shape[0], 1, -1)
        positions = torch.arange(patches_BPH.shape[1] + 1, device=patches_BPH.device)
        # Called as a module (not .weight): per-module gradient hooks (TP sums) see the lookup.
        hidden_BSH = torch.cat([cls_B1H, patches_BPH], dim=1) + self.position_embedding(positions)
        hidden_BSH = self.pre_norm(hidden_BSH)
        seq = hidden_BSH.shape[1]
        everything = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=hidden_BSH.device)  # bidirectional
        for layer in list(self.encoder.layers.values())[:used]:
            hidden_BSH = layer(hidden_BSH, None, everything)
        return hidden_BSH
