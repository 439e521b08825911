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


def test_process_wide_backend(monkeypatch):
    """MEGACORE_KERNELS / set_kernel_backend: "torch" never picks Triton, "triton" acts like force_triton."""
    from megacore.kernels import _dispatch

    x = torch.randn(2, 8)
    with _dispatch.kernel_backend("torch"):
        assert not use_triton(x)
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with _dispatch.kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            use_triton(x)
    monkeypatch.setenv("MEGACORE_KERNELS", "Torch")
    assert _dispatch._backend_from_env() == "torch"
    monkeypatch.setenv("MEGACORE_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEGACORE_KERNELS='fast'"):
        _dispatch._backend_from_env()
