"""Single-mixer layers of hybrid stacks (``model.layer_pattern``).

Each layer is one pre-norm residual block, ``x = x + dropout(mixer(norm(x)))``, whose mixer is
picked by its character in the pattern (the Megatron / NemotronH convention):

    'M'  MambaLayer       a Mamba-2 mixer (megacore.layers.mamba); with a KV cache it keeps its
                          recurrent state there instead of keys and values
    '*'  AttentionLayer   self-attention (rotary, masks and KV cache as in TransformerLayer)
    '-'  MLPLayer         the MLP (an MoE layer when model.num_experts is set)

A pattern-free model keeps the two-block ``TransformerLayer``. All layer classes take the same
``forward(hidden, rotary, mask, kv_cache)`` so the block, pipeline stages and recomputation treat
them alike; the mixers that do not use an argument ignore it.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers.spec import LayerSpec


class _SingleMixerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int, spec: LayerSpec):
        super().__init__()
        self.layer_number = layer_number
        self.input_norm = spec.input_norm(config, config.hidden_size)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def mix(self, normed_BSH, rotary, mask, kv_cache):
        raise NotImplementedError

    def forward(self, hidden_BSH: torch.Tensor, rotary=None, mask=None, kv_cache=None) -> torch.Tensor:
        return hidden_BSH + self.hidden_dropout(self.mix(self.input_norm(hidden_BSH), rotary, mask, kv_cache))


class MambaLayer(_SingleMixerLayer):
    def __init__(self, config: TransformerConfig, layer_number: int, spec: LayerSpec):
        super().__init__(config, layer_number, spec)
        from megacore.layers.mamba import MambaMixer

        self.mixer = MambaMixer(config)

    def mix(self, normed_BSH, rotary, mask, kv_cache):
        if kv_cache is not None:  # incremental decoding: the mask is the cache's causal one, which the
            # scan already is; the layer's recurrent state lives in the cache
            return self.mixer(normed_BSH, state=kv_cache.mamba_state(self.mixer.conv1d.kernel_size[0]))
        if mask is not None and self.mixer.context_parallel is None:  # (under CP: the CP causal mask,
            # which the state-passing scan follows; the support table refuses documents there)
            return self.mixer(normed_BSH, seq_idx=sequence_index(mask, normed_BSH.shape[0]))
        return self.mixer(normed_BSH)


def sequence_index(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Each position's document number [B, S] from the attention layers' boolean mask [B or 1, 1, S, S]
    (True = may attend): position t continues t-1's sequence exactly when it may attend to it, so
    packed documents (``data.reset_attention_mask``) and left padding start new sequences there."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"Mamba layers read document boundaries from a boolean [B, 1, S, S] attention mask; got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    continues = mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1)          # [B, S-1]: t may see t-1
    starts = torch.cat([torch.zeros_like(continues[:, :1]), ~continues], dim=1)
    return starts.to(torch.int64).cumsum(dim=1).expand(batch, -1)


class AttentionLayer(_SingleMixerLayer):
    def __init__(self, config: TransformerConfig, layer_number: int, spec: LayerSpec):
        super().__init__(config, layer_number, spec)
        self.self_attention = spec.self_attention(config, spec.core_attention)

    def mix(self, normed_BSH, rotary, mask, kv_cache):
        if kv_cache is None:
            return self.self_attention(normed_BSH, rotary, mask)
        return self.self_attention(normed_BSH, rotary, mask, kv_cache=kv_cache)


class MLPLayer(_SingleMixerLayer):
    def __init__(self, config: TransformerConfig, layer_number: int, spec: LayerSpec):
        super().__init__(config, layer_number, spec)
        self.mlp = spec.feed_forward(config, layer_number)

    def mix(self, normed_BSH, rotary, mask, kv_cache):
        return self.mlp(normed_BSH)


HYBRID_LAYERS = {"M": MambaLayer, "*": AttentionLayer, "-": MLPLayer}
