"""RMSNorm and LayerNorm, with the zero-centred-gamma option.

Zero-centred gamma stores ``weight - 1`` (initialized to 0) and applies ``1 + weight``: weight
decay then pulls the scale towards 1 instead of 0. Both norms compute their statistics in fp32 and
return the input dtype.

RMSNorm runs the fused Triton kernel (``megacore.kernels.rms_norm``) where the kernel backend says so
(CUDA tensors by default, see ``megacore.kernels._dispatch``) and the plain-torch code below
otherwise. It can also take the residual: ``norm(x, residual=r)`` returns ``(norm(r + x), r + x)``,
one kernel for the add and the norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.kernels._dispatch import use_triton
from megacore.kernels.rmsnorm import rms_norm
from megacore.sharding import mark_init


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², last dim) + eps) · gamma   (gamma = 1 + weight when zero-centred).

    ``forward(x)`` -> y; ``forward(x, residual=r)`` -> (norm(r + x), r + x) (``fuses_residual``).
    """

    fuses_residual = True

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        init = 0.0 if zero_centered_gamma else 1.0
        self.weight = mark_init(nn.Parameter(torch.full((dim,), init)), "zeros" if zero_centered_gamma else "ones")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_triton(x, kernel="RMSNorm"):
            y, new_residual = rms_norm(x, self.weight, self.eps, residual, self.zero_centered_gamma)
            return y if residual is None else (y, new_residual)
        if residual is not None:
            h = residual + x
            return self._normalize(h), h
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-torch reference: statistics in fp32, normalized value rounded, then scaled."""
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        gamma = self.weight + 1 if self.zero_centered_gamma else self.weight
        return normed * gamma.to(x.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) · gamma + beta   (gamma = 1 + weight when zero-centred)."""

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        init = 0.0 if zero_centered_gamma else 1.0
        self.weight = mark_init(nn.Parameter(torch.full((dim,), init)), "zeros" if zero_centered_gamma else "ones")
        self.bias = mark_init(nn.Parameter(torch.zeros(dim)), "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.layer_norm(x, (x.shape[-1],), gamma.to(x.dtype), self.bias.to(x.dtype), self.eps)


def build_norm(config: TransformerConfig, dim: int | None = None) -> nn.Module:
    """The norm named by ``config.normalization`` over ``dim`` (default hidden_size)."""
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return cls(dim or config.hidden_size, config.norm_epsilon, config.layernorm_zero_centered_gamma)
