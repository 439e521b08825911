"""Choosing between a Triton kernel and its plain-torch reference.

Every kernel in this package has a reference written in plain torch ops that runs anywhere. The
Triton path runs when the inputs live on a CUDA device and Triton imports. On a CPU machine the
Triton code can still be exercised through Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is first imported) by passing ``force_triton=True``: that is how CI tests the
kernels on tiny shapes.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (it may still lack a GPU: see ``interpreter_enabled``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor, force_triton: bool = False, kernel: str = "kernel") -> bool:
    """Decide the path for ``tensor``: Triton on CUDA (or interpreter + ``force_triton``), else torch.

    ``force_triton=True`` on CPU without the interpreter raises instead of silently running the
    reference, so a test that asks for the kernel always gets the kernel.
    """
    if not triton_available():
        if force_triton:
            raise RuntimeError(f"{kernel}: force_triton=True but triton does not import; install triton "
                               f"or call without force_triton to use the torch reference")
        return False
    if tensor.is_cuda:
        return True
    if force_triton:
        if not interpreter_enabled():
            raise RuntimeError(f"{kernel}: force_triton=True with a {tensor.device.type} tensor needs "
                               f"TRITON_INTERPRET=1 set before triton is imported (or CUDA inputs)")
        return True
    return False


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1): Triton block sizes must be powers of two."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_programs_hint(device: torch.device, default: int = 4) -> int:
    """Number of streaming multiprocessors on a CUDA device (a good persistent-grid size), else ``default``."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return default
