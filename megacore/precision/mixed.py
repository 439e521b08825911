"""Mixed-precision helpers: dtype names, which machinery a dtype needs, casting a model.

megacore's default recipe ("Megatron style"): parameters and activations in bf16/fp16, gradients
accumulated in fp32 (``DistributedDataParallel`` ``main_grad`` buffers), fp32 master weights and
AdamW moments in the optimizer, loss scaling for fp16 only. The alternative "AMP style" keeps fp32
parameters and runs matmuls under ``torch.autocast`` (see :func:`autocast`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF_DTYPES = (torch.bfloat16, torch.float16)


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``"fp32"|"bf16"|"fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported for training; use one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"precision dtype {dtype!r} is not known; use one of {list(DTYPES)}")
    return DTYPES[dtype]


def needs_master_weights(dtype: torch.dtype) -> bool:
    """bf16/fp16 parameters lose small updates (``w + lr·u`` rounds back to ``w``): keep fp32 masters."""
    return dtype in HALF_DTYPES


def needs_loss_scaling(dtype: torch.dtype) -> bool:
    """Only fp16 (5 exponent bits) underflows gradients; bf16 has fp32's exponent range."""
    return dtype == torch.float16


@torch.no_grad()
def cast_params_(module: nn.Module, dtype: torch.dtype,
                 keep_fp32: Optional[Callable[[str, torch.Tensor], bool]] = None) -> nn.Module:
    """Cast floating-point parameters and buffers of ``module`` to ``dtype`` in place.

    ``keep_fp32(name, tensor)`` exempts tensors (e.g. a router's weights). Parameter objects and
    their ``_megacore_*`` attributes survive (only ``.data`` changes), so optimizers and hooks built
    later see the cast tensors.
    """
    for name, p in module.named_parameters():
        if p.is_floating_point() and not (keep_fp32 and keep_fp32(name, p)):
            p.data = p.data.to(dtype)
    for name, b in module.named_buffers():
        if b.is_floating_point() and not (keep_fp32 and keep_fp32(name, b)):
            b.data = b.data.to(dtype)
    return module


def autocast(device_type: str, dtype: torch.dtype):
    """``torch.autocast`` for half dtypes, a no-op context for fp32 (AMP-style training)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
