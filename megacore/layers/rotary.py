"""Rotary position embeddings: standard, linear, Llama-3 and YaRN frequency scaling, partial rotary.

Half-rotation layout (GPT-NeoX / HF Llama): the first ``rotary_dim`` channels of each head are
split into halves (x1, x2) and rotated as (x1·cos − x2·sin, x2·cos + x1·sin) with
θ_i = position · inv_freq_i; channels past ``rotary_dim`` pass through unchanged.

The module holds no buffers (so meta-device construction and ``to_empty`` need no fix-ups): it
computes ``inv_freq`` in fp32 on first use and caches cos/sin per (length, device, dtype).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.kernels._dispatch import use_triton
from megacore.kernels.rope import apply_rotary as apply_rotary_triton


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, orig_len: int) -> torch.Tensor:
    """Llama-3.1 scaling: wavelengths longer than orig_len/low are slowed by ``factor``, shorter than
    orig_len/high kept, and the band between interpolated smoothly in 1/wavelength."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig_len / low, orig_len / high
    smooth = ((orig_len / wavelen) - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, interpolated, out)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times: 0.1·mscale·ln(scale) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_yarn_mscale = yarn_mscale


def _yarn_inv_freq(dim: int, base: float, factor: float, orig_len: int, beta_fast: float, beta_slow: float):
    """YaRN: per-dimension blend of extrapolated (unchanged) and interpolated (÷factor) frequencies.

    Dimension d completes ``orig_len / wavelen_d`` rotations over the original context; dims with more
    than ``beta_fast`` rotations keep their frequency, fewer than ``beta_slow`` are interpolated, and a
    linear ramp in between.
    """

    def dim_for_rotations(n_rot: float) -> float:
        return (dim * math.log(orig_len / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    lo = max(math.floor(dim_for_rotations(beta_fast)), 0)
    hi = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    extrapolate_weight = 1 - ramp
    inv = _base_inv_freq(dim, base)
    return inv / factor * (1 - extrapolate_weight) + inv * extrapolate_weight


def rotary_dim_of(config: TransformerConfig) -> int:
    """Channels rotated per head: ``qk_rope_head_dim`` (the decoupled rotary part of each query and
    key) under multi-latent attention, else ``config.rotary_dim``."""
    return config.qk_rope_head_dim if config.multi_latent_attention else config.rotary_dim


def rotary_inv_freq(config: TransformerConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rotary_dim/2] fp64, attention scaling applied to cos/sin)."""
    dim, base = rotary_dim_of(config), config.rotary_base
    kind, factor = config.rotary_scaling, config.rotary_scaling_factor
    if kind is None:
        return _base_inv_freq(dim, base), 1.0
    if kind == "linear":
        return _base_inv_freq(dim, base) / factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(dim, base), factor, config.rotary_low_freq_factor,
                                config.rotary_high_freq_factor, config.rotary_original_max_positions), 1.0
    if kind == "yarn":
        inv = _yarn_inv_freq(dim, base, factor, config.rotary_original_max_positions,
                             config.rotary_beta_fast, config.rotary_beta_slow)
        if config.rotary_mscale_all_dim:
            attn = _yarn_mscale(factor, config.rotary_mscale) / _yarn_mscale(factor, config.rotary_mscale_all_dim)
        else:
            attn = _yarn_mscale(factor, config.rotary_mscale)
        return inv, attn
    raise ValueError(f"unknown rotary_scaling {kind!r}")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [S, rotary_dim] (or [B, S, rotary_dim] for explicit position ids)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.rotary_dim = rotary_dim_of(config)
        inv_freq, self.attention_scaling = rotary_inv_freq(config)
        self._inv_freq_cpu = inv_freq.float()
        self._inv_freq_on: dict = {}  # device -> inv_freq there (no host-to-device copy per decode step,
        # which a captured CUDA graph could not hold)
        self._cache: dict = {}

    def forward(self, seq_len: int, device, dtype, position_ids: torch.Tensor | None = None):
        if position_ids is not None:
            inv = self._inv_freq_on.get(str(device))
            if inv is None:
                inv = self._inv_freq_on[str(device)] = self._inv_freq_cpu.to(device)
            angles = position_ids.float()[..., None] * inv  # [B, S, rd/2]
            return self._cos_sin(angles, dtype)
        key = (seq_len, str(device), dtype)
        if key not in self._cache:
            positions = torch.arange(seq_len, dtype=torch.float32, device=device)
            angles = positions[:, None] * self._inv_freq_cpu.to(device)[None, :]
            self._cache = {key: self._cos_sin(angles, dtype)}  # keep one entry: the usual case is a fixed length
        return self._cache[key]

    def _cos_sin(self, angles: torch.Tensor, dtype):
        emb = torch.cat([angles, angles], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary_reference(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of every head; cos/sin are [S, rd] or [B, S, rd]."""
    rd = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x_BSHD[..., :rd], x_BSHD[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def apply_rotary(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_reference``, or the Triton kernel where the kernel backend says so (CUDA by default)."""
    if x_BSHD.dtype != torch.float64 and use_triton(x_BSHD, kernel="apply_rotary"):
        return apply_rotary_triton(x_BSHD, cos, sin)
    return apply_rotary_reference(x_BSHD, cos, sin)
