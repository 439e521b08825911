"""Choosing between a Triton kernel and its plain-torch reference.

Every kernel in this package has a reference written in plain torch ops that runs anywhere. The
Triton path runs when the inputs live on a CUDA device and Triton imports. On a CPU machine the
Triton code can still be exercised through Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is first imported) by passing ``force_triton=True``: that is how CI tests the
kernels on tiny shapes.

One process-wide backend, read from ``MEGACORE_KERNELS`` at import and changed with
``set_kernel_backend`` / ``kernel_backend(...)``, applies to every call that does not pass
``force_triton`` (the model's layers among them):

    auto    Triton for CUDA tensors in eager mode, the torch reference otherwise (the default).
            Under ``torch.compile`` it traces the reference: inductor fuses it into its own
            kernels, launched from the compiled graph, where each of our custom ops would cost a
            Python-level launch (~0.1-0.4 ms of host time per call, measured on H100: enough to
            make a tensor-parallel step host-bound)
    triton  Triton always: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (else an error)
    torch   the torch reference always (e.g. to let ``torch.compile`` fuse the reference instead)

The decision reads only a module global, the tensor's device and the environment, so
``torch.compile`` traces it without a graph break (and guards on the backend).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")


def _backend_from_env() -> str:
    name = os.environ.get("MEGACORE_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MEGACORE_KERNELS={name!r} is not known; use one of {BACKENDS}")
    return name


_BACKEND = _backend_from_env()


def get_kernel_backend() -> str:
    """The process-wide kernel backend: "auto", "triton" or "torch" (see the module docstring)."""
    return _BACKEND


def set_kernel_backend(name: str) -> str:
    """Set the process-wide kernel backend; returns the previous one. Compiled code recompiles."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not known; use one of {BACKENDS}")
    previous, _BACKEND = _BACKEND, name
    return previous


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend("torch"): ...`` runs the block with that backend, then restores the old one."""
    previous = set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(previous)


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


_TRITON_IMPORTS = triton_available()  # decided once: keeps use_triton trivial for torch.compile


def use_triton(tensor: torch.Tensor, force_triton: bool = False, kernel: str = "kernel",
               under_compile: bool = False) -> bool:
    """Decide the path for ``tensor``: Triton on CUDA (or interpreter + ``force_triton``), else torch.

    Without ``force_triton`` the process-wide backend decides ("torch": never; "triton": as if
    forced). ``force_triton=True`` (or backend "triton") on CPU without the interpreter raises
    instead of silently running the reference, so a test that asks for the kernel always gets it.
    ``under_compile=True``: "auto" keeps the kernel under ``torch.compile`` too (for kernels such as
    the Mamba scan, whose reference inductor cannot fuse into anything close to the kernel).
    """
    if not force_triton:
        if _BACKEND == "torch" or (_BACKEND == "auto" and not under_compile and torch.compiler.is_compiling()):
            return False
        force_triton = _BACKEND == "triton"
    if not _TRITON_IMPORTS:
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
