"""Swap in your own MLP without forking the model: a ReLU² MLP with a learned per-channel scale.

    y = fc2( relu(fc1(x))² ⊙ s )        x [batch, seq, hidden], fc1: hidden -> F, fc2: F -> hidden,
                                        s [F] a learned scale, initialized to 1

A ``LayerSpec`` names the class that builds each submodule of a transformer layer; every entry is
called as ``cls(config)`` (norms as ``fn(config, dim)``). Here only the MLP changes::

    model = GPTModel(config, layer_spec=LayerSpec(mlp=ReluSquaredMLP))

Keeping the default attribute names (``linear_fc1``, ``linear_fc2``) lets tensor parallelism and
Hugging Face interop recognise the weights. Tagging each parameter with ``mark_init`` tells
``megacore.models.init.materialize`` how to fill it, so the same seed gives the same model on any
parallel layout.

Run it (with megacore installed, e.g. ``pip install -e .``):  python examples/custom_mlp.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.layers import LayerSpec
from megacore.sharding import mark_init
from megacore.models import GPTModel


class ReluSquaredMLP(nn.Module):
    """fc2(relu(fc1(x))² * channel_scale); hidden_BSH [B, S, H] -> [B, S, H]."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        ffn = config.ffn_size
        self.linear_fc1 = nn.Linear(config.hidden_size, ffn, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.add_bias_linear)
        self.channel_scale = nn.Parameter(torch.ones(ffn))
        mark_init(self.linear_fc1.weight, "normal")
        mark_init(self.linear_fc2.weight, "scaled_normal")  # residual-branch output: std / sqrt(2L)
        mark_init(self.channel_scale, "ones")
        for lin in (self.linear_fc1, self.linear_fc2):
            if lin.bias is not None:
                mark_init(lin.bias, "zeros")

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        act_BSF = F.relu(self.linear_fc1(hidden_BSH)).square() * self.channel_scale
        return self.linear_fc2(act_BSF)


def tiny_config() -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=128, vocab_size=256, seq_length=32)


def main(steps: int = 8, seed: int = 0, verbose: bool = True) -> dict:
    """Build the model with the custom MLP, then fit one fixed random batch for ``steps`` AdamW steps.

    Returns ``{"model", "losses", "input_ids", "labels"}``; the loss falls as the batch is memorized.
    """
    config = tiny_config()
    model = GPTModel(config, layer_spec=LayerSpec(mlp=ReluSquaredMLP), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (4, config.seq_length + 1), generator=gen)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]  # labels are the already-shifted next tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if verbose:
            print(f"step {step}  loss {loss.item():.4f}")
    return {"model": model, "losses": losses, "input_ids": input_ids, "labels": labels}


if __name__ == "__main__":
    main()
