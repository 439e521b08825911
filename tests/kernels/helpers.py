"""Shared tolerances and skips for the kernel tests.

Tolerances are relative to the largest magnitude of the expected tensor (so sums such as dweight
are judged on their own scale):

    fp32: 2e-5         bf16: 2e-2 (≈ 2.5 ulp: the CPU interpreter truncates fp32→bf16 instead of rounding
                        to nearest, so its bf16 results may sit one ulp from torch's)
    fp16: 4e-3 (≈ 4 ulp)
"""

from __future__ import annotations

import os

import pytest
import torch

from megacore.kernels import triton_available

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# Triton runs here either on a GPU or in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
needs_triton = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")

# Interpreter or GPU: the device the Triton path runs on in these tests.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual − expected| <= tol · max(|expected|, 1e-6), computed in fp64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} x scale {scale:.3g}"
