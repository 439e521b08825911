"""Gradient accumulation into an fp32 main-grad buffer: Triton kernel + reference.

    accumulate_grad_(main_grad, grad, overwrite=False):   main_grad += float(grad)
    accumulate_grad_(main_grad, grad, overwrite=True):    main_grad  = float(grad)

DDP's per-parameter hook runs this once per parameter and micro-batch (bf16 grad into the fp32
buffer: 10 bytes of traffic per parameter). torch's ``add_`` with mixed dtypes takes its
non-vectorized elementwise path, measured at ~2.1 TB/s on H100 for the 1B model (4.3 ms per
micro-batch); a plain vectorized streaming kernel gets closer to the card's bandwidth.
``overwrite=True`` is the first gradient of a step: it needs no zeroed buffer and reads nothing
back (6 bytes per parameter instead of 10, and no separate zeroing pass of 4). Measured with
DDP's lazy zeroing on the 1B step (BENCHMARKS.md section 6): -3.8 ms with one micro-batch per
step, -1.0 ms per micro-batch with eight.

Both tensors must be contiguous with the same number of elements; ``main_grad`` fp32.
"""

from __future__ import annotations

import torch

from megacore.kernels._dispatch import triton_available, use_triton

_BLOCK = 4096


def accumulate_grad_reference(main_grad: torch.Tensor, grad: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``main_grad.copy_(grad)`` or ``main_grad.add_(grad)`` (plain torch); returns ``main_grad``."""
    return main_grad.copy_(grad) if overwrite else main_grad.add_(grad)


def accumulate_grad_(main_grad: torch.Tensor, grad: torch.Tensor, overwrite: bool = False,
                     force_triton: bool = False) -> torch.Tensor:
    """``main_grad (+)= grad`` in place (see the module docstring); returns ``main_grad``."""
    if main_grad.numel() != grad.numel():
        raise ValueError(f"accumulate_grad_: main_grad has {main_grad.numel()} elements, grad {grad.numel()}")
    fits = (main_grad.dtype == torch.float32 and main_grad.is_contiguous() and grad.is_contiguous()
            and grad.device == main_grad.device and 0 < grad.numel() < 2**31)
    if not fits or not use_triton(main_grad, force_triton, "accumulate_grad_"):
        return accumulate_grad_reference(main_grad, grad, overwrite)
    n = grad.numel()
    _kernel[(triton.cdiv(n, _BLOCK),)](main_grad, grad, n, OVERWRITE=overwrite, BLOCK=_BLOCK, num_warps=8)
    return main_grad


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(acc_ptr, grad_ptr, n, OVERWRITE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        value = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if not OVERWRITE:
            value += tl.load(acc_ptr + offs, mask=mask)
        tl.store(acc_ptr + offs, value, mask=mask)
