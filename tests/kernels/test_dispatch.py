"""Path selection: reference on CPU by default, Triton only when asked and possible, a clear error otherwise."""

import pytest
import torch

from megacore.kernels import rms_norm, swiglu, triton_available
from megacore.kernels._dispatch import next_power_of_2, use_triton


def test_cpu_without_force_uses_reference():
    x = torch.randn(2, 8, requires_grad=True)
    y = swiglu(x)
    assert "GatedFunction" not in type(y.grad_fn).__name__  # plain torch autograd graph
    assert not use_triton(x)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_force_triton_without_interpreter_or_cuda_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.ones(8), force_triton=True)


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 48, 64, 65)] == [1, 1, 2, 4, 64, 64, 128]
