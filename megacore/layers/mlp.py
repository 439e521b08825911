"""Feed-forward block: fc1 -> activation (optionally gated) -> fc2.

Gated activations (SwiGLU, GeGLU) keep gate and up projections in one ``linear_fc1`` whose rows
are ``[gate (F rows); up (F rows)]``: one GEMM instead of two. They run as one fused Triton kernel
(``megacore.kernels.gated_activation``) where the kernel backend says so (CUDA by default), else in
plain torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from megacore.layers.rng import checkpoint

from megacore.config import TransformerConfig
from megacore.kernels._dispatch import use_triton
from megacore.kernels.swiglu import gated_activation
from megacore.sharding import mark_init


def _squared_relu(x):
    return F.relu(x).square()


ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "relu": F.relu,
    "squared_relu": _squared_relu,
    "swiglu": F.silu,  # applied to the gate half
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


# The fused kernel's name for each gated activation's gate function.
_KERNEL_ACTIVATION = {"swiglu": "silu", "geglu": "gelu_tanh"}


def gated_activation_reference(x_fused: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = x_fused.chunk(2, dim=-1)
    return ACTIVATION_FNS[activation](gate) * up


def mlp_activation(x: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """fc1's output -> the activation fc2 reads: the fused gated kernel where the kernel backend
    allows (not fp64), else plain torch."""
    if gated:
        kernel_act = _KERNEL_ACTIVATION.get(activation)
        if kernel_act is not None and x.dtype != torch.float64 and use_triton(x, kernel="gated activation"):
            return gated_activation(x, kernel_act)
        return gated_activation_reference(x, activation)
    return ACTIVATION_FNS[activation](x)


class MLP(nn.Module):
    """``ffn_size`` overrides ``config.ffn_size`` (an MoE layer's shared expert has its own width)."""

    def __init__(self, config: TransformerConfig, ffn_size: Optional[int] = None):
        super().__init__()
        self.activation = config.activation
        self.gated = config.gated_mlp
        ffn = ffn_size if ffn_size is not None else config.ffn_size
        self.linear_fc1 = nn.Linear(config.hidden_size, 2 * ffn if self.gated else ffn, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.add_bias_linear)
        mark_init(self.linear_fc1.weight, "normal")
        mark_init(self.linear_fc2.weight, "scaled_normal")
        for lin in (self.linear_fc1, self.linear_fc2):
            if lin.bias is not None:
                mark_init(lin.bias, "zeros")
        # Selective recomputation: keep only fc1's output and recompute the activation in backward.
        self.recompute_activation = False

    def activation_fn(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_activation(x, self.activation, self.gated)

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        fc1_out = self.linear_fc1(hidden_BSH)
        if self.recompute_activation and self.training and torch.is_grad_enabled():
            return self.linear_fc2(checkpoint(self.activation_fn, fc1_out))
        return self.linear_fc2(self.activation_fn(fc1_out))
