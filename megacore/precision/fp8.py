"""FP8 linear layers with tensorwise dynamic scaling (``precision.fp8: tensorwise``).

Recipe ("tensorwise", the dynamic per-tensor recipe): every GEMM operand gets ONE fp32 scale,
recomputed from the tensor itself at every call (no amax history)::

    amax(t)  = max |t|  over the whole tensor, clamped to >= EPS (1e-12)
    s(t)     = FP8_MAX / amax(t)                       (fp32; 448 for e4m3, 57344 for e5m2)
    q(t)     = cast_fp8(clamp(t * s(t), -FP8_MAX, FP8_MAX))
    deq(t)   = q(t) * (1 / s(t))

For ``y = x Wᵀ + b`` with x [..., in] flattened to X [M, K] and W [N, K]:

    forward   Y  = deq_e4m3(X) · deq_e4m3(W)ᵀ                      (output in x's dtype)
    backward  G  = dL/dY,  Ĝ = deq_e5m2(G)
              dX = Ĝ · deq_e4m3(W)                                 (e5m2 x e4m3)
              dW = Ĝᵀ · deq_e4m3(X)                                (e5m2 x e4m3)
              db = Σ_rows G                                        (unquantized, bias dtype)

Each product runs as one ``torch._scaled_mm`` on the fp8 tensors, the two inverse scales applied
to the fp32 accumulator; e4m3 (more mantissa) for activations and weights, e5m2 (more range) for
gradients. The forward GEMM uses fast accumulation (as torchao's default), the two backward GEMMs
do not. The forward's fp8 casts of X and W (W already transposed into the layout the dX GEMM
reads) and their scales are what is saved for the backward, not the higher-precision originals:
the backward uses exactly the quantized operands of the forward, so this is both cheaper in memory
and the same math.

Only the GEMMs change. Parameters, master weights, gradients (``main_grad``) and the optimizer
stay as ``precision.dtype`` / ``master_weights`` say; nothing fp8 lives between steps.

Weight cache (``fp8_weight_cache``): the micro-batches of one optimizer step share their weights,
so the trainer quantizes each weight once per step instead of once per micro-batch; the values
are the ones each pass would compute, so nothing numerical changes.

Fallback: a call whose M, K or N is not a multiple of 16 (``_scaled_mm`` requires it), whose
dtype is not fp32/bf16/fp16, or whose device has no fp8 GEMM (CUDA below compute capability 8.9,
or a CPU build of torch without ``_scaled_mm``) runs as plain ``F.linear`` for that call.

Tensor parallelism: each rank scales its own local operands (a column-parallel weight shard, a
row-parallel input shard); the outputs are dequantized before any TP reduction, so the layers
stay exact up to the (per-rank) quantization.

``apply_fp8(model)`` switches a model's linear layers to this path in place, keeping parameter
names (checkpoints and Hugging Face import/export are unchanged). The output layer is skipped by
default (the logits feed a softmax over the whole vocabulary; their precision is where fp8 costs
the most accuracy, and Megatron/TE keep it in high precision too); embeddings are lookups, not
GEMMs, and are never converted.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
EPS = 1e-12
RECIPES = ("tensorwise",)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16


# ------------------------------------------------------------------------------------ quantization
def tensorwise_scale(t: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """0-dim fp32 ``FP8_MAX / max(amax(t), EPS)``: the quantization scale of ``t`` (no gradient)."""
    amax = t.detach().abs().amax().float()
    return torch.finfo(fp8_dtype).max / torch.clamp(amax, min=EPS)


def to_fp8(t: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``cast(clamp(t * scale))`` computed in fp32, row-major contiguous."""
    fmax = torch.finfo(fp8_dtype).max
    return (t.detach().float() * scale).clamp(-fmax, fmax).to(fp8_dtype).contiguous()


def quantize_dequantize(t: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fp32 value that the fp8 path computes with for ``t``: ``to_fp8(t) * (1 / scale)``."""
    scale = tensorwise_scale(t, fp8_dtype)
    return to_fp8(t, scale, fp8_dtype).float() * scale.reciprocal()


# ------------------------------------------------------------------------------------ support
_SUPPORT: dict = {}


def _probe_fp8_gemm(device_type: str, index: Optional[int]) -> bool:
    if device_type == "cuda":
        if getattr(torch.version, "hip", None):
            return False  # ROCm uses the *fnuz fp8 formats; not wired here
        return torch.cuda.get_device_capability(index) >= (8, 9)
    if device_type == "cpu":
        try:  # CPU _scaled_mm is recent (torch 2.13 has it); probe once
            a = torch.zeros(_ALIGN, _ALIGN, dtype=E5M2)
            b = torch.zeros(_ALIGN, _ALIGN, dtype=E4M3)
            one = torch.ones((), dtype=torch.float32)
            torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.float32)
            return True
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            return False
    return False


# Under torch.compile, dynamo runs this eagerly and bakes the result into the graph as a constant
# (no graph break, no tracing of the probe).
@torch.compiler.assume_constant_result
def _device_has_fp8_gemm(device_type: str, index: Optional[int]) -> bool:
    key = (device_type, index)
    if key not in _SUPPORT:
        _SUPPORT[key] = _probe_fp8_gemm(device_type, index)
    return _SUPPORT[key]


def fp8_supported(device: torch.device | str) -> bool:
    """True when fp8 GEMMs (``torch._scaled_mm``) run on ``device``."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _device_has_fp8_gemm(device.type, index)


def fp8_device_problem(device: torch.device | str) -> Optional[str]:
    """None if ``precision.fp8`` can train on ``device``, else what is wrong (for a ConfigError)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"precision.fp8 trains on NVIDIA GPUs with compute capability >= 8.9 (H100, H200, L40S, "
                f"RTX 4090), but the run's device is {device.type}; use device=cuda on such a GPU, or set "
                "precision.fp8=null")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if getattr(torch.version, "hip", None):
        return "precision.fp8 is not supported on ROCm builds of torch here; set precision.fp8=null"
    cap = torch.cuda.get_device_capability(index)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(index)
        return (f"precision.fp8 needs fp8 tensor cores (compute capability >= 8.9: Hopper H100/H200 or Ada), "
                f"but {name} has compute capability {cap[0]}.{cap[1]}; set precision.fp8=null and train in "
                "precision.dtype=bf16 on this GPU")
    return None


def _fp8_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Static checks only (shapes, dtypes, device): no data-dependent branching, compile-friendly."""
    if weight.dim() != 2 or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        return False
    if x.device != weight.device:
        return False
    k, n = x.shape[-1], weight.shape[0]
    m = x.numel() // k if k else 0
    if m == 0 or m % _ALIGN or k % _ALIGN or n % _ALIGN:
        return False
    return _device_has_fp8_gemm(x.device.type, x.device.index)


# ------------------------------------------------------------------------------------ the GEMMs
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w8, w8_t, w_inv)``: e4m3 ``weight`` [N, K] row-major, the same values transposed and
    row-major ([K, N], the layout the input-gradient GEMM reads), and the inverse scale."""
    scale = tensorwise_scale(weight, E4M3)
    w8 = to_fp8(weight, scale, E4M3)
    return w8, w8.t().contiguous(), scale.reciprocal()


class _Fp8LinearFn(torch.autograd.Function):
    """X [M, K], W [N, K] -> X Wᵀ [M, N] with the three GEMMs in fp8 (bias handled outside).

    ``w8, w8_t, w_inv`` are ``quantize_weight(weight)`` when a weight cache supplies them (the
    weight is then only the tensor the gradient belongs to), else None and computed here."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, w8=None, w8_t=None, w_inv=None) -> torch.Tensor:
        if w8 is None:
            w8, w8_t, w_inv = quantize_weight(weight)
        x_scale = tensorwise_scale(x2d, E4M3)
        x8, x_inv = to_fp8(x2d, x_scale, E4M3), x_scale.reciprocal()
        # _scaled_mm: first operand row-major, second column-major (w8.t() of row-major w8).
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x2d.dtype, use_fast_accum=True)
        ctx.save_for_backward(x8, w8_t, x_inv, w_inv)
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, w8_t, x_inv, w_inv = ctx.saved_tensors
        g_scale = tensorwise_scale(grad_out, E5M2)
        g8 = to_fp8(grad_out, g_scale, E5M2)
        g_inv = g_scale.reciprocal()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dX [M, K] = G [M, N] · W [N, K]; W as the column-major second operand (w8_t row-major [K, N])
            dx = torch._scaled_mm(g8, w8_t.t(), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # dW [N, K] = Gᵀ [N, M] · X [M, K]; Gᵀ row-major, X column-major
            dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               weight_fp8: Optional[tuple] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its forward and both backward GEMMs in fp8 (tensorwise
    dynamic scaling, see the module docstring). x [..., in], weight [out, in] -> [..., out] in x's
    dtype. ``weight_fp8``: ``quantize_weight(weight)`` computed earlier (``fp8_weight_cache``), or
    None to quantize here. Falls back to ``F.linear`` where the fp8 GEMM cannot run (shapes not
    multiples of 16, unsupported device/dtype)."""
    if not _fp8_eligible(x, weight):
        return F.linear(x, weight, bias)
    y = _Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, *(weight_fp8 or (None, None, None)))
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Fp8Matmul:
    """The GEMM strategy ``apply_fp8`` hands a linear layer: ``fp8_linear(x, weight, bias)``, reading
    the weight's cast from ``weight_cache`` when ``fp8_weight_cache`` has filled it. One per layer
    (the cache holds that layer's weight)."""

    def __init__(self):
        self.weight_cache: Optional[tuple] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fp8_linear(x, weight, bias, self.weight_cache)


# ------------------------------------------------------------------------------------ weight cache
def fp8_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose GEMMs run in fp8 (their ``matmul`` is an ``Fp8Matmul``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "matmul", None), Fp8Matmul)]


_QUANTIZE_COMPILED: dict = {}


def _quantizer(device: torch.device):
    """``quantize_weight``, compiled on CUDA (one fused amax pass and one cast+transpose pass per
    weight instead of ~6 eager kernels); eager elsewhere."""
    if device.type != "cuda":
        return quantize_weight
    if "cuda" not in _QUANTIZE_COMPILED:
        _QUANTIZE_COMPILED["cuda"] = torch.compile(quantize_weight, dynamic=False)
    return _QUANTIZE_COMPILED["cuda"]


@contextlib.contextmanager
def fp8_weight_cache(models: Iterable[nn.Module]) -> Iterator[None]:
    """Quantize every fp8 weight once, on entry, and let all forwards inside reuse it.

    Gradient accumulation runs k forward/backward passes with the same weights; without the cache
    each pass recomputes every weight's amax, e4m3 cast and transposed copy (~7 bytes of traffic
    per parameter; measured: 1.7 ms per micro-batch on the 1B model, H100). Inside this context the
    k passes read the casts made on entry, which are the very values the uncached path computes
    (same function, same inputs), so results are bit-identical.

    The weights must not change inside the context (wrap one optimizer step's micro-batches, after
    any parameter all-gather of the distributed optimizer has finished); on exit the cache is
    dropped, so a forward outside (evaluation, the next step) quantizes the current weights.
    """
    modules = [m for model in models for m in fp8_modules(model)]
    with torch.no_grad():
        for m in modules:
            m.matmul.weight_cache = _quantizer(m.weight.device)(m.weight) if m.weight.dim() == 2 else None
    try:
        yield
    finally:
        for m in modules:
            m.matmul.weight_cache = None


# ------------------------------------------------------------------------------------ reference
class _FakeQuant(torch.autograd.Function):
    """Forward: ``quantize_dequantize(t)`` (fp32); backward: the gradient unchanged (cast back)."""

    @staticmethod
    def forward(ctx, t, fp8_dtype):
        ctx.dtype = t.dtype
        return quantize_dequantize(t, fp8_dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None


class _FakeQuantGrad(torch.autograd.Function):
    """Forward: identity; backward: ``quantize_dequantize(grad)`` (fp32 in, fp32 out)."""

    @staticmethod
    def forward(ctx, t, fp8_dtype):
        ctx.fp8_dtype = fp8_dtype
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return quantize_dequantize(g, ctx.fp8_dtype), None


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch emulation of ``fp8_linear``'s numerics (always quantizes, no fallback).

    x and W are quantized to e4m3 and dequantized in fp32 (``deq(q(t)) = q(t) · (1/s(t))``, with
    ``s = FP8_MAX / amax`` over the whole tensor), then multiplied in fp32; the product is cast to
    x's dtype. In the backward the incoming gradient of that product (in x's dtype) is quantized
    and dequantized through e5m2 before it reaches the two fp32 matmuls, so

        dX = deq(q5(G)) · deq(q4(W)),    dW = deq(q5(G))ᵀ · deq(q4(X)),    db = Σ G.

    The gradients then pass to x and W unchanged (straight-through) and are cast to their dtypes.
    Kernel and reference differ only in summation order / where the scales are applied.
    """
    xq = _FakeQuant.apply(x, E4M3)
    wq = _FakeQuant.apply(weight, E4M3)
    # The gradient arriving here is x's dtype upcast to fp32 (exact), so quantizing it equals
    # quantizing the kernel's grad_output; the dequantized values stay fp32 like the kernel's.
    y = _FakeQuantGrad.apply(torch.matmul(xq, wq.t()), E5M2).to(x.dtype)
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------ modules
class Float8Linear(nn.Linear):
    """``nn.Linear`` whose forward is its ``matmul`` strategy, an ``Fp8Matmul``. Same parameters and
    state-dict names; ``apply_fp8`` turns plain ``nn.Linear`` instances into this class in place."""

    matmul: Fp8Matmul

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.matmul(input, self.weight, self.bias)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip)


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", skip: Iterable[str] = ("output_layer",)) -> int:
    """Make ``model``'s linear layers compute in fp8, in place; returns how many were converted.

    Plain ``nn.Linear`` modules become ``Float8Linear`` (class switch: parameters, names, hooks and
    init markers stay); layers that take a GEMM strategy (a ``matmul`` attribute that is still
    ``F.linear``: the tensor-parallel linears) are handed an ``Fp8Matmul``; the routed experts of MoE
    layers (a ``grouped_matmul`` slot) an ``Fp8GroupedMatmul`` (``megacore.precision.fp8_grouped``:
    rowwise scales, fp8 forward and input gradient). Modules whose name (or any component of it) is in ``skip`` stay as they
    are: by default the output layer, whose logits are the most precision-sensitive GEMM. Other
    subclasses of ``nn.Linear`` are left alone. Call it after ``megacore.parallel.parallelize``
    (which replaces linears by TP layers) and before ``torch.compile``, DDP or FSDP wrap the model,
    as the trainer does. Applying it twice converts nothing the second time.
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is not known; use one of {list(RECIPES)}")
    skip = tuple(skip)
    converted = 0
    for name, module in model.named_modules():
        if _skipped(name, skip):
            continue
        if type(module) is nn.Linear:
            module.__class__ = Float8Linear
            module.matmul = Fp8Matmul()
            converted += 1
        elif getattr(module, "matmul", None) is F.linear:
            module.matmul = Fp8Matmul()
            converted += 1
        elif hasattr(module, "grouped_matmul") and module.grouped_matmul is None:  # routed experts
            from megacore.precision.fp8_grouped import Fp8GroupedMatmul

            module.grouped_matmul = Fp8GroupedMatmul()
            converted += 1
    return converted


__all__ = ["E4M3", "E5M2", "Float8Linear", "Fp8Matmul", "RECIPES", "apply_fp8", "fp8_device_problem", "fp8_linear",
           "fp8_linear_reference", "fp8_modules", "fp8_supported", "fp8_weight_cache", "quantize_dequantize",
           "quantize_weight", "tensorwise_scale", "to_fp8"]
