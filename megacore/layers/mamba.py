"""Mamba-2 mixer (state space duality, SSD) for hybrid stacks (``model.layer_pattern`` 'M').

Per head h (``mamba_num_heads`` heads of ``mamba_head_dim`` = P channels) with state size N
(``mamba_state_dim``), the layer computes a selective linear recurrence over the sequence::

    dt_t  = clamp(softplus(dt_raw_t + dt_bias), min=dt_clamp_min)         (one scalar per head)
    a_t   = exp(dt_t · A),  A = -exp(A_log) < 0                             (decay in (0, 1])
    S_t   = a_t · S_{t-1} + dt_t · x_t ⊗ B_t                                (state [P, N], S_0 = 0)
    y_t   = S_t · C_t + D · x_t

x, B, C come from a depthwise causal conv1d (kernel ``mamba_conv_kernel``) + SiLU over the
projected input; B and C are shared by the heads of each of ``mamba_num_groups`` groups. The
output is ``out_proj(rmsnorm_g(y · silu(z)))`` with a gate z from the same input projection and an
RMSNorm taken per group of channels. Parameter names and the packed ``in_proj`` layout
``[z | x B C | dt]`` follow Mamba-2 (and Megatron / Hugging Face NemotronH), so checkpoints map
one to one.

``ssd_chunked`` evaluates the recurrence in chunks of ``mamba_chunk_size`` positions: inside a
chunk as a masked (attention-like) matrix product, across chunks through the carried state, one
small loop over the chunks. ``ssd_reference`` is the step-by-step recurrence (tests). Both live
beside the Triton scan in ``megacore.kernels.ssd_scan`` and are re-exported here.

Kernels (``MEGACORE_KERNELS``, ``megacore.kernels._dispatch``): on CUDA with Triton (backend
auto or triton, also under ``torch.compile``) the mixer runs the Triton causal conv1d + SiLU
(``kernels.causal_conv1d``), the Triton SSD scan (``kernels.ssd_scan``) and, for a one-position step
with a ``MambaState``, the fused decode step (``kernels.ssd_decode``); backend torch keeps the plain
torch path below. A context-parallel mixer runs the strategy's conv and scan (which use the same
kernels per chunk). Packed documents (``seq_idx``) run both kernels with document resets.

``MambaMixer.context_parallel``: None, or a sequence strategy handed in by the parallel code when
the local sequence is this rank's share of a context-parallel split
(``megacore.parallel.mamba_context_parallel``): its ``conv_silu(xbc [B, S, C], weight, bias)`` replaces
the causal conv + SiLU and its ``scan(x, dt, A, B, C, chunk_size, D)`` the SSD scan, each continuing the
recurrence from the positions other ranks hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megacore.config import TransformerConfig
from megacore.kernels._dispatch import use_triton
from megacore.kernels.causal_conv1d import causal_conv1d_silu
from megacore.kernels.ssd_decode import mamba_decode_step
from megacore.kernels.ssd_scan import ssd_chunked, ssd_reference, ssd_scan  # noqa: F401 (re-exported)
from megacore.sharding import mark_init

def gated_rms_norm(y, z, weight, group_size: int, eps: float):
    """``weight · rmsnorm(y · silu(z))`` with the RMS taken over groups of ``group_size`` channels
    (math in fp32, result cast back to y's dtype before the weight, as Mamba-2 does)."""
    dtype = y.dtype
    v = y.float() * F.silu(z.float())
    groups = v.view(*v.shape[:-1], v.shape[-1] // group_size, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return weight * groups.view(v.shape).to(dtype)


class MambaMixer(nn.Module):
    """Mamba-2 mixer: hidden [B, S, H] -> [B, S, H] (see the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.num_heads, self.head_dim = c.mamba_heads, c.mamba_head_dim
        self.state_dim, self.num_groups = c.mamba_state_dim, c.mamba_num_groups
        self.inner = self.num_heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.num_groups * self.state_dim
        self.chunk_size, self.dt_clamp_min, self.eps = c.mamba_chunk_size, c.mamba_dt_clamp_min, c.norm_epsilon
        self.in_proj = nn.Linear(c.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.mamba_conv_kernel, groups=self.conv_dim,
                                padding=c.mamba_conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm_weight = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, c.hidden_size, bias=False)
        mark_init(self.in_proj.weight, "normal")
        mark_init(self.out_proj.weight, "scaled_normal")
        mark_init(self.norm_weight, "ones")
        mark_init(self.D, "ones")
        # Mamba-2's recipe (megacore.models.init): A = 1..num_heads, dt log-uniform in [1e-3, 0.1]
        # through softplus⁻¹, the depthwise conv as nn.Conv1d draws it.
        mark_init(self.A_log, "mamba_A_log")
        mark_init(self.dt_bias, "mamba_dt_bias")
        mark_init(self.conv1d.weight, "conv_uniform")
        mark_init(self.conv1d.bias, "conv_uniform")
        self.context_parallel = None  # see the module docstring (parallel code hands it in)

    def forward(self, hidden_BSH: torch.Tensor, state: "MambaState | None" = None,
                seq_idx: "torch.Tensor | None" = None) -> torch.Tensor:
        """``state``: the recurrent state of the positions before these (incremental decoding); it is
        read and then advanced past them. None: the sequence starts here. ``seq_idx`` [B, S]: packed
        documents, each position's document number (non-decreasing along a row); the conv and the
        scan start afresh at every document, exactly as if each were its own sequence."""
        projected = self.in_proj(hidden_BSH)
        b, s = projected.shape[:2]  # under sequence parallelism in_proj gathered the full sequence
        z, xbc, dt = projected.split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        cp = self.context_parallel
        if cp is not None and state is not None:
            raise ValueError("a context-parallel Mamba mixer has no incremental decoding; decode with a whole "
                             "one-device model")
        if seq_idx is not None and (cp is not None or state is not None):
            raise ValueError("packed documents (seq_idx) are for a whole sequence on one rank: not with a "
                             "context-parallel split nor with incremental decoding")
        if seq_idx is not None and seq_idx.shape != (b, s):
            raise ValueError(f"seq_idx {tuple(seq_idx.shape)} must be [batch, seq] = [{b}, {s}]")
        # The Triton kernels (megacore.kernels: causal_conv1d, ssd_scan, ssd_decode) where selected;
        # the context-parallel strategy brings its own conv and scan; packed documents (seq_idx) reset
        # the state in both kernels.
        fast = (cp is None and projected.dtype != torch.float64
                and use_triton(projected, kernel="mamba mixer", under_compile=True))
        A = -torch.exp(self.A_log.float())
        if fast and state is not None and s == 1:
            return self._decode_step(z, xbc, dt, A, state, hidden_BSH.dtype)
        if seq_idx is not None:  # packed documents: the Triton conv where selected, else its torch reference
            xbc = causal_conv1d_silu(xbc, self.conv1d.weight, self.conv1d.bias, force_triton=fast, seq_idx=seq_idx)
        elif cp is not None:
            xbc = cp.conv_silu(xbc, self.conv1d.weight, self.conv1d.bias)
        elif fast:
            initial = None if state is None else state.conv_inputs(b, xbc)
            if state is not None:
                keep = self.conv1d.kernel_size[0] - 1
                window = torch.cat([initial, xbc.transpose(1, 2)], dim=-1)
                state.conv = window[..., window.shape[-1] - keep:].detach().contiguous()
            xbc = causal_conv1d_silu(xbc, self.conv1d.weight, self.conv1d.bias, initial, force_triton=True)
        else:
            if state is None:
                xbc = self.conv1d(xbc.transpose(1, 2))[..., :s]
            else:  # the conv window reaches back into the cached inputs of the last kernel-1 positions
                window = torch.cat([state.conv_inputs(b, xbc), xbc.transpose(1, 2)], dim=-1)
                keep = self.conv1d.kernel_size[0] - 1
                state.conv = window[..., window.shape[-1] - keep:].detach()  # (not [-keep:]: keep may be 0)
                xbc = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
            xbc = F.silu(xbc).transpose(1, 2)
        x, B, C = xbc.split([self.inner, self.num_groups * self.state_dim, self.num_groups * self.state_dim], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(min=self.dt_clamp_min)
        x = x.reshape(b, s, self.num_heads, self.head_dim)
        B, C = B.reshape(b, s, self.num_groups, self.state_dim), C.reshape(b, s, self.num_groups, self.state_dim)
        initial_state = None if state is None else state.ssm
        if cp is not None:
            y = cp.scan(x, dt, A, B, C, self.chunk_size, D=self.D)
        elif fast:
            y, final = ssd_scan(x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=initial_state,
                                force_triton=True, seq_idx=seq_idx)
        else:
            y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=initial_state,
                                   seq_idx=seq_idx)
        if state is not None:
            state.ssm = final.detach()
        y = gated_rms_norm(y.reshape(b, s, self.inner), z, self.norm_weight, self.inner // self.num_groups, self.eps)
        return self.out_proj(y.to(hidden_BSH.dtype))

    def _decode_step(self, z, xbc, dt, A, state: "MambaState", out_dtype: torch.dtype) -> torch.Tensor:
        """One new position with the fused decode kernels (``megacore.kernels.ssd_decode``)."""
        b = xbc.shape[0]
        conv = state.conv_inputs(b, xbc)
        if not conv.is_contiguous():
            conv = state.conv = conv.contiguous()
        if state.ssm is None:
            state.ssm = xbc.new_zeros(b, self.num_heads, self.head_dim, self.state_dim, dtype=torch.float32)
        elif state.ssm.dtype != torch.float32 or not state.ssm.is_contiguous():
            state.ssm = state.ssm.float().contiguous()
        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float()).clamp(min=self.dt_clamp_min)
        y = mamba_decode_step(conv, state.ssm, xbc[:, 0], dt, A, self.conv1d.weight, self.conv1d.bias, self.D,
                              self.num_heads, self.head_dim, self.num_groups, self.state_dim, force_triton=True)
        y = gated_rms_norm(y.to(z.dtype)[:, None], z, self.norm_weight, self.inner // self.num_groups, self.eps)
        return self.out_proj(y.to(out_dtype))


class MambaState:
    """One Mamba layer's recurrent state for incremental decoding: the raw conv inputs of the last
    ``kernel - 1`` positions [B, conv_dim, kernel-1] and the SSM state [B, heads, head_dim, state]
    (fp32). Both start as zeros, exactly what the uncached forward assumes before position 0."""

    def __init__(self, kernel: int):
        self.kernel = kernel
        self.conv: torch.Tensor | None = None
        self.ssm: torch.Tensor | None = None

    def conv_inputs(self, batch: int, xbc_BSC: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            self.conv = xbc_BSC.new_zeros(batch, xbc_BSC.shape[-1], self.kernel - 1)
        return self.conv
