"""Triton kernels, each beside the plain-torch reference it must match.

Every public function here dispatches: the Triton kernel when its input is on CUDA and Triton
imports (or, for tests on CPU, with ``TRITON_INTERPRET=1`` set before importing triton and
``force_triton=True``), else the ``*_reference`` function, which runs anywhere. The process-wide
backend (``MEGACORE_KERNELS=auto|triton|torch``, ``set_kernel_backend``, ``with kernel_backend(...)``)
turns the kernels off everywhere, or forces them (CPU tensors then need the interpreter); the
model's layers follow it. The kernels are torch custom ops (``megacore::*``), so ``torch.compile``
keeps them in its graphs without graph breaks.

- ``rms_norm``: fused residual add + RMSNorm, returns (y, new_residual)
- ``apply_rotary``: half-rotation RoPE with partial rotary and optional position_ids
- ``swiglu`` / ``geglu`` / ``gated_activation``: act(gate)·up over [gate ; up]
- ``fused_linear_cross_entropy``: chunked linear + CE that never holds all logits; vocab-parallel aware
- ``ssd_scan``: Mamba-2 SSD chunked scan (reference ``ssd_chunked``; ``ssd_reference`` the recurrence)
- ``causal_conv1d_silu``: Mamba's causal depthwise conv1d + SiLU, optional initial conv inputs
- ``mamba_decode_step``: one fused Mamba-2 generation step (conv window shift + SSM state update)

Note: the functions ``swiglu``, ``fused_linear_cross_entropy`` and ``ssd_scan`` share their module's name, so the
attribute ``megacore.kernels.swiglu`` is the function; import module contents with
``from megacore.kernels.swiglu import ...`` (which always resolves the module).
"""

from megacore.kernels._dispatch import get_kernel_backend, kernel_backend, set_kernel_backend, triton_available
from megacore.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from megacore.kernels.rmsnorm import rms_norm, rms_norm_reference
from megacore.kernels.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
from megacore.kernels.rope import apply_rotary, apply_rotary_reference
from megacore.kernels.ssd_decode import mamba_decode_step, mamba_decode_step_reference
from megacore.kernels.ssd_scan import ssd_chunked, ssd_reference, ssd_scan
from megacore.kernels.swiglu import (
    gated_activation,
    gated_activation_reference,
    geglu,
    geglu_reference,
    swiglu,
    swiglu_reference,
)

__all__ = [
    "apply_rotary",
    "apply_rotary_reference",
    "causal_conv1d_silu",
    "causal_conv1d_silu_reference",
    "fused_linear_cross_entropy",
    "gated_activation",
    "gated_activation_reference",
    "get_kernel_backend",
    "geglu",
    "geglu_reference",
    "kernel_backend",
    "linear_cross_entropy_reference",
    "mamba_decode_step",
    "mamba_decode_step_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_kernel_backend",
    "ssd_chunked",
    "ssd_reference",
    "ssd_scan",
    "swiglu",
    "swiglu_reference",
    "triton_available",
]
