"""Gated activations SwiGLU and GeGLU, fused forward and backward: Triton kernels + references.

Input x_fused [..., 2F] holds [gate (F) ; up (F)] (the layout of ``MLP.linear_fc1``); output [..., F]:

    y = act(gate) · up
    dgate = dy · up · act'(gate)        dup = dy · act(gate)

Activations (math in fp32):
    silu(g)       = g·σ(g)                       silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
    gelu(g)       = g·Φ(g) = ½g(1 + erf(g/√2))    gelu'(g) = Φ(g) + g·φ(g),  φ(g) = e^(−g²/2)/√(2π)
    gelu_tanh(g)  = ½g(1 + tanh(u)) = g·σ(2u),   u = √(2/π)(g + 0.044715 g³)
                    gelu_tanh'(g) = σ(2u) + 2g·σ(2u)(1 − σ(2u))·√(2/π)(1 + 3·0.044715 g²)

The backward recomputes act(gate) from the saved input (nothing else is stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacore.kernels._dispatch import next_power_of_2, triton_available, use_triton

_ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def _split(x_fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x_fused.shape[-1] % 2:
        raise ValueError(f"gated activation: last dim {x_fused.shape[-1]} must be even ([gate F ; up F]); "
                         f"check that linear_fc1 has 2*ffn_hidden_size outputs")
    return x_fused.chunk(2, dim=-1)


def gated_activation_reference(x_fused: torch.Tensor, activation: str) -> torch.Tensor:
    """Plain-torch act(gate)·up for activation in {"silu", "gelu", "gelu_tanh"} (math in ≥fp32)."""
    if activation not in _ACT_IDS:
        raise ValueError(f"gated activation {activation!r} unknown; use one of {sorted(_ACT_IDS)}")
    gate, up = _split(x_fused)
    acc = torch.promote_types(x_fused.dtype, torch.float32)
    gate, up = gate.to(acc), up.to(acc)
    if activation == "silu":
        act = F.silu(gate)
    else:
        act = F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (act * up).to(x_fused.dtype)


def swiglu_reference(x_fused: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up, plain torch."""
    return gated_activation_reference(x_fused, "silu")


def geglu_reference(x_fused: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate)·up, plain torch; approximate "tanh" (default, as the MLP's geglu) or "none" (erf)."""
    return gated_activation_reference(x_fused, _gelu_name(approximate))


def _gelu_name(approximate: str) -> str:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate={approximate!r}; use 'tanh' or 'none'")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in fp32 for ACT 0 = silu, 1 = exact gelu, 2 = tanh gelu."""
        if ACT == 0:
            sg = tl.sigmoid(g)
            act = g * sg
            dact = sg * (1.0 + g * (1.0 - sg))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))  # 1/sqrt(2)
            act = g * cdf
            dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1/sqrt(2*pi)
        else:
            k = 0.7978845608028654  # sqrt(2/pi)
            u = k * (g + 0.044715 * g * g * g)
            sg = tl.sigmoid(2.0 * u)  # ½(1 + tanh(u)) without a tanh intrinsic
            act = g * sg
            dact = sg + 2.0 * g * sg * (1.0 - sg) * k * (1.0 + 3.0 * 0.044715 * g * g)
        return act, dact

    @triton.jit
    def _gated_fwd_kernel(X, Y, F_, stride_x, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        act, _ = _act_and_grad(g, ACT)
        tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_kernel(X, DY, DX, F_, stride_x, stride_dy, stride_dx, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        act, dact = _act_and_grad(g, ACT)
        tl.store(DX + row * stride_dx + cols, (dy * u * dact).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + row * stride_dx + F_ + cols, (dy * act).to(DX.dtype.element_ty), mask=mask)


_BLOCK = 1024  # elements of F per program: enough work per program, few registers


def _grid(m: int, f: int, block: int):
    return (m, triton.cdiv(f, block))


def _gated_forward(x_fused: torch.Tensor, act_id: int) -> torch.Tensor:
    two_f = x_fused.shape[-1]
    f = two_f // 2
    x2 = x_fused.contiguous().view(-1, two_f)
    y = torch.empty(x2.shape[0], f, device=x2.device, dtype=x2.dtype)
    block = min(_BLOCK, next_power_of_2(f))
    if y.numel():
        _gated_fwd_kernel[_grid(x2.shape[0], f, block)](x2, y, f, x2.stride(0), y.stride(0), ACT=act_id,
                                                         BLOCK=block, num_warps=4)
    return y.view(*x_fused.shape[:-1], f)


def _gated_backward(x_fused: torch.Tensor, dy: torch.Tensor, act_id: int) -> torch.Tensor:
    two_f = x_fused.shape[-1]
    f = two_f // 2
    x2 = x_fused.contiguous().view(-1, two_f)
    dy2 = dy.contiguous().view(-1, f)
    dx = torch.empty_like(x2)
    block = min(_BLOCK, next_power_of_2(f))
    if dx.numel():
        _gated_bwd_kernel[_grid(x2.shape[0], f, block)](x2, dy2, dx, f, x2.stride(0), dy2.stride(0),
                                                         dx.stride(0), ACT=act_id, BLOCK=block, num_warps=4)
    return dx.view(x_fused.shape)


# Custom ops (opaque to torch.compile: no graph break). The backward recomputes act(gate) from x.
@torch.library.custom_op("megacore::gated_act_fwd", mutates_args=())
def _gated_fwd_op(x_fused: torch.Tensor, act_id: int) -> torch.Tensor:
    return _gated_forward(x_fused, act_id)


@_gated_fwd_op.register_fake
def _(x_fused, act_id):
    return x_fused.new_empty(*x_fused.shape[:-1], x_fused.shape[-1] // 2)


@torch.library.custom_op("megacore::gated_act_bwd", mutates_args=())
def _gated_bwd_op(x_fused: torch.Tensor, dy: torch.Tensor, act_id: int) -> torch.Tensor:
    return _gated_backward(x_fused, dy, act_id)


@_gated_bwd_op.register_fake
def _(x_fused, dy, act_id):
    return x_fused.new_empty(x_fused.shape)


def _gated_setup(ctx, inputs, output):
    x_fused, act_id = inputs
    ctx.save_for_backward(x_fused)
    ctx.act_id = act_id


def _gated_autograd(ctx, dy):
    (x_fused,) = ctx.saved_tensors
    return _gated_bwd_op(x_fused, dy, ctx.act_id), None


_gated_fwd_op.register_autograd(_gated_autograd, setup_context=_gated_setup)


def gated_activation(x_fused: torch.Tensor, activation: str, force_triton: bool = False) -> torch.Tensor:
    """act(gate)·up over x_fused [..., 2F] = [gate ; up] -> [..., F]; activation silu / gelu / gelu_tanh.

    Triton on CUDA (or interpreter + ``force_triton``), else the reference; fp64 uses the reference.
    """
    if activation not in _ACT_IDS:
        raise ValueError(f"gated activation {activation!r} unknown; use one of {sorted(_ACT_IDS)}")
    _split(x_fused)
    if x_fused.dtype == torch.float64 or not use_triton(x_fused, force_triton, "gated activation"):
        return gated_activation_reference(x_fused, activation)
    return _gated_fwd_op(x_fused, _ACT_IDS[activation])


def swiglu(x_fused: torch.Tensor, force_triton: bool = False) -> torch.Tensor:
    """silu(gate)·up over x_fused [..., 2F] = [gate F ; up F] -> [..., F]."""
    return gated_activation(x_fused, "silu", force_triton)


def geglu(x_fused: torch.Tensor, approximate: str = "tanh", force_triton: bool = False) -> torch.Tensor:
    """gelu(gate)·up over x_fused [..., 2F] -> [..., F]; approximate "tanh" (the MLP's geglu) or "none" (erf)."""
    return gated_activation(x_fused, _gelu_name(approximate), force_triton)
