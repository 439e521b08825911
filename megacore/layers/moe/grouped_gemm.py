"""The experts' GEMMs over rows grouped by expert: one grouped GEMM for all experts, beside its
reference (one ``F.linear`` per expert).

Rows ``x`` [R, K] are sorted by expert; ``ends`` [E] (int32, on the device) holds the cumulative
row counts, so expert e owns rows ``[ends[e-1], ends[e])`` (``ends[-1] <= R``: rows past it belong
to no expert, and their outputs are unspecified). ``weight`` is [E, N, K] (``F.linear``'s layout with
an expert dimension in front)::

    y[r] = x[r] · weight[e(r)]ᵀ            for each row r of expert e(r)

``grouped_linear`` runs this as one ``torch._grouped_mm`` launch with no host read of ``ends``, so
it needs no device sync and compiles without a graph break. ``grouped_linear_reference`` reads the
counts on the host and loops; it is the numerical reference and the path for dtypes and devices the
grouped kernel does not take (fp64 anywhere; CUDA before Hopper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_DTYPES = (torch.bfloat16, torch.float32)


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``grouped_linear`` can run these operands: this torch has ``torch._grouped_mm``, the
    dtype is bf16, or fp32 on CPU outside ``torch.compile``; on CUDA the kernel also needs Hopper or
    newer and rows of a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_DTYPES:
        return False
    if x.device.type == "cpu":  # fp32 runs eagerly only: the compiler's shape rule takes bf16 alone
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    n, k = weight.shape[-2:]
    return n % 8 == 0 and k % 8 == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """y = x · weight[e]ᵀ per expert group, one ``torch._grouped_mm`` (see the module docstring)."""
    return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=ends)


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The same product, one ``F.linear`` per expert (reads ``ends`` on the host: one sync). Rows
    past ``ends[-1]`` come out zero."""
    bounds = [0] + ends.tolist()
    pieces = [F.linear(x[bounds[e]:bounds[e + 1]], weight[e].to(x.dtype)) for e in range(weight.shape[0])]
    tail = x.shape[0] - bounds[-1]
    if tail:
        pieces.append(x.new_zeros((tail, weight.shape[-2])))
    out = torch.cat(pieces)
    if bounds[-1] == 0:  # no rows: keep the weight in the graph so every rank's backward reaches it
        out = out + 0.0 * weight.sum()
    return out
