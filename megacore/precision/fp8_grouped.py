"""FP8 grouped GEMMs for the routed experts (``precision.fp8`` with ``model.num_experts``).

The experts' product is ``y[r] = x[r] · W[e(r)]ᵀ`` over rows sorted by expert, expert e owning rows
``[ends[e-1], ends[e])`` (``megacore.layers.moe.grouped_gemm``). Here its forward and its input
gradient run as fp8 grouped GEMMs (``torch._scaled_grouped_mm``, Hopper), with *rowwise* dynamic
scales — one fp32 scale per row of each operand, the granularity that kernel takes, and finer than
the dense layers' one scale per tensor, which matters here because one tensor mixes the rows of
every expert::

    amax_r(t) = max_j |t[r, j]|, clamped to >= EPS         (per row r, over the contracted dim)
    s_r(t)    = 448 / amax_r(t)                            (e4m3 for every operand: the kernel
    q(t)[r]   = cast_e4m3(clamp(t[r] * s_r(t)))             takes no e5m2)

    forward   Y[r]    = Σ_k q(X)[r, k] q(W_e)[n, k] / (s_r(X) s_n(W_e))   W_e rows scaled per output n
    backward  G = dL/dY
              dX[r]   = Σ_n q(G)[r, n] q(W_eᵀ)[k, n] / (s_r(G) s_k(W_eᵀ))  W_e scaled per input column k
              dW_e    = G_eᵀ · X_e                                        (bf16 grouped GEMM, unquantized)

The weight gradient stays in the input's dtype: its contraction runs over each expert's tokens, a
grouped dimension that the fp8 kernel needs padded to 16-row groups; the two quantized GEMMs are
the ones on the per-token critical path. ``grouped_linear_fp8_reference`` computes the same math
per expert with the quantization emulated in fp32 (the numerical reference, and the path on
devices without the kernel).

Eligibility is static (dtype bf16, CUDA capability >= 9.0, torch has the kernel, widths multiples
of 16); otherwise the caller's plain grouped GEMM runs.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
EPS = 1e-12
_ALIGN = 16


def rowwise_scale(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``448 / max(amax over the last dim, EPS)``: one quantization scale per row of ``t``."""
    amax = t.detach().abs().amax(dim=-1).float()
    return torch.finfo(E4M3).max / torch.clamp(amax, min=EPS)


def to_fp8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, inv)``: ``t`` cast to e4m3 with its rowwise scales (row-major contiguous), and the
    inverse scales (fp32, the shape of ``t`` without its last dim)."""
    scale = rowwise_scale(t)
    fmax = torch.finfo(E4M3).max
    q = (t.detach().float() * scale.unsqueeze(-1)).clamp(-fmax, fmax).to(E4M3).contiguous()
    return q, scale.reciprocal()


def dequantize_rowwise(t: torch.Tensor) -> torch.Tensor:
    """The fp32 values the fp8 path computes with for ``t``."""
    q, inv = to_fp8_rowwise(t)
    return q.float() * inv.unsqueeze(-1)


def fp8_grouped_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``grouped_linear_fp8`` can run these operands (static checks only)."""
    if not hasattr(torch, "_scaled_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if getattr(torch.version, "hip", None) or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    n, k = weight.shape[-2:]
    return n % _ALIGN == 0 and k % _ALIGN == 0


class _Fp8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        x8, x_inv = to_fp8_rowwise(x)                              # [R, K], [R]
        w8, w_inv = to_fp8_rowwise(weight)                         # [E, N, K], [E, N]: per output row
        # The kernel's second operand is [E, K, N] column-major: the transposed view of row-major w8.
        y = torch._scaled_grouped_mm(x8, w8.transpose(-2, -1), x_inv, w_inv, offs=ends, out_dtype=x.dtype,
                                     use_fast_accum=True)
        ctx.save_for_backward(x, weight, ends)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, ends = ctx.saved_tensors
        dx = dw = None
        g = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            g8, g_inv = to_fp8_rowwise(g)                          # [R, N], [R]
            wt8, wt_inv = to_fp8_rowwise(weight.transpose(-2, -1))  # [E, K, N], [E, K]: per input column
            dx = torch._scaled_grouped_mm(g8, wt8.transpose(-2, -1), g_inv, wt_inv, offs=ends, out_dtype=x.dtype)
        if ctx.needs_input_grad[1]:
            # dW_e [N, K] = G_eᵀ X_e: a grouped GEMM whose groups split the contracted (token) dim.
            dw = torch._grouped_mm(g.t(), x, offs=ends).to(weight.dtype)
        return dx, dw, None


def grouped_linear_fp8(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``y[r] = x[r] · weight[e(r)]ᵀ`` with the forward and input-gradient GEMMs in fp8 (see the
    module docstring). x [R, K] bf16, weight [E, N, K], ends [E] int32 on the device."""
    return _Fp8GroupedLinear.apply(x, weight.to(x.dtype), ends)


def grouped_linear_fp8_reference(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The same forward and gradients, one expert at a time, the quantization emulated in fp32
    (autograd through straight-through quantizers: the gradient of a quantized operand is taken as
    the gradient of the operand, and the incoming gradient is quantized on its way to dX only)."""
    bounds = [0] + ends.tolist()
    pieces = []
    for e in range(weight.shape[0]):
        xe = x[bounds[e]:bounds[e + 1]]
        pieces.append(_EmulatedExpertLinear.apply(xe, weight[e]).to(x.dtype))
    tail = x.shape[0] - bounds[-1]
    if tail:
        pieces.append(x.new_zeros((tail, weight.shape[-2])))
    return torch.cat(pieces)


class _EmulatedExpertLinear(torch.autograd.Function):
    """One expert's ``x · wᵀ`` with the fp8 recipe emulated in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        if x.shape[0] == 0:
            return x.new_zeros((0, w.shape[0]), dtype=torch.float32)
        return dequantize_rowwise(x) @ dequantize_rowwise(w).t()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        if x.shape[0] == 0:
            return x.new_zeros(x.shape), torch.zeros_like(w)
        dx = (dequantize_rowwise(g.to(x.dtype)) @ dequantize_rowwise(w.t()).t()).to(x.dtype)
        dw = (g.to(x.dtype).float().t() @ x.float()).to(w.dtype)
        return dx, dw


class Fp8GroupedMatmul:
    """The grouped-GEMM strategy ``apply_fp8`` hands the routed experts: ``grouped_linear_fp8`` where
    it can run, else ``None`` (the experts then take their own grouped GEMM)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor):
        if not fp8_grouped_available(x, weight):
            return None
        return grouped_linear_fp8(x, weight, ends)


__all__ = ["Fp8GroupedMatmul", "dequantize_rowwise", "fp8_grouped_available", "grouped_linear_fp8",
           "grouped_linear_fp8_reference", "rowwise_scale", "to_fp8_rowwise"]
