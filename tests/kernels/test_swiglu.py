"""SwiGLU / GeGLU: Triton kernels vs the torch reference vs fp64 autograd (tiny shapes)."""

import pytest
import torch
import torch.nn.functional as F

from megacore.kernels import gated_activation, gated_activation_reference, geglu, swiglu
from megacore.layers.mlp import gated_activation_reference as layer_gated
from tests.kernels.helpers import DEVICE, TOL, assert_close, needs_triton

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

FP64_ACT = {
    "silu": F.silu,
    "gelu": lambda g: F.gelu(g, approximate="none"),
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_triton_matches_reference_and_fp64(dtype, activation):
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(4, 8, 2 * 40, generator=gen)).to(DEVICE, dtype)  # wide range: both tails of the act
    dy = torch.randn(4, 8, 40, generator=gen, dtype=torch.float64).to(DEVICE)
    got = {}
    for name, fn in [("triton", lambda t: gated_activation(t, activation, force_triton=True)),
                     ("reference", lambda t: gated_activation_reference(t, activation))]:
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y.double() * dy).sum().backward()
        got[name] = (y, xi.grad)
    assert got["triton"][0].dtype == dtype and got["triton"][1].dtype == dtype
    tol = TOL[dtype]
    assert_close(got["triton"][0], got["reference"][0], tol, "y vs reference")
    assert_close(got["triton"][1], got["reference"][1], tol, "dx vs reference")
    x64 = x.double().requires_grad_()
    gate, up = x64.chunk(2, dim=-1)
    y64 = FP64_ACT[activation](gate) * up
    (y64 * dy).sum().backward()
    assert_close(got["triton"][0], y64, 2 * tol, "y vs fp64")
    assert_close(got["triton"][1], x64.grad, 2 * tol, "dx vs fp64")


@needs_triton
def test_named_wrappers_and_multi_block_rows():
    """swiglu / geglu wrappers, F larger than one program's block (masking at the block edge)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2 * 1100, generator=gen).to(DEVICE)
    assert_close(swiglu(x, force_triton=True), layer_gated(x.double(), "swiglu"), TOL[torch.float32], "swiglu")
    assert_close(geglu(x, force_triton=True), layer_gated(x.double(), "geglu"), TOL[torch.float32], "geglu tanh")
    exact = F.gelu(x.double()[:, :1100]) * x.double()[:, 1100:]
    assert_close(geglu(x, approximate="none", force_triton=True), exact, TOL[torch.float32], "geglu exact")


def test_gated_validation_errors():
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown"):
        gated_activation(torch.randn(2, 8), "relu")
    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.randn(2, 8), approximate="erf")
