"""Gradient accumulation into fp32 main grads: Triton kernel vs the torch reference (tiny shapes),
and DDP's lazy zeroing (first gradient of a step overwrites; parameters without one read zeros)."""

import pytest
import torch
from torch import nn

from megacore.distributed.ddp import DistributedDataParallel
from megacore.kernels.grad_accumulate import accumulate_grad_, accumulate_grad_reference
from tests.kernels.helpers import DEVICE, needs_triton


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 1000, 4096, 4096 * 2 + 17])
@pytest.mark.parametrize("overwrite", [False, True])
def test_triton_matches_reference_exactly(dtype, n, overwrite):
    gen = torch.Generator().manual_seed(n)
    acc = torch.randn(n, generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(DEVICE, dtype)
    expected = accumulate_grad_reference(acc.clone(), grad, overwrite)
    got = acc.clone()
    assert accumulate_grad_(got, grad, overwrite, force_triton=True) is got
    assert torch.equal(got, expected)  # one fp32 add (or a cast) per element: no rounding freedom


def test_shapes_must_agree_and_odd_layouts_use_the_reference():
    with pytest.raises(ValueError, match="elements"):
        accumulate_grad_(torch.zeros(4), torch.zeros(5))
    acc, grad = torch.ones(4, 3), torch.arange(12.0).view(3, 4).t()  # non-contiguous grad: reference path
    assert torch.equal(accumulate_grad_(acc, grad), 1 + grad)


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b=True):
        return self.a(x) + (self.b(x) if use_b else 0)


def test_lazy_zeroing_over_steps_and_micro_batches():
    """Step 1 accumulates two micro-batches; step 2 (after zero_grad_buffer) runs one micro-batch
    that skips ``b``: ``a`` holds exactly step 2's gradient and ``b`` reads zeros after the sync,
    as with eager zeroing and plain ``.grad`` accumulation."""
    torch.manual_seed(0)
    model = _TwoBranch()
    ref = _TwoBranch()
    ref.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, dp_group=None)
    xs = [torch.randn(3, 4) for _ in range(3)]
    for x in xs[:2]:
        with ddp.no_sync():
            ddp(x).square().sum().backward()
        ref(x).square().sum().backward()
    ddp.finish_grad_sync()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.main_grad, q.grad, rtol=1e-6, atol=1e-7), name
    ddp.zero_grad_buffer()
    ref.zero_grad(set_to_none=False)
    ddp(xs[2], use_b=False).square().sum().backward()
    ref(xs[2], use_b=False).square().sum().backward()
    ddp.finish_grad_sync()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.main_grad, q.grad, rtol=1e-6, atol=1e-7), name
    assert not model.b.weight.main_grad.any()
    # padding between parameters is never written, so whole-buffer reductions see zeros there
    buf = ddp.grad_buffers[0]
    covered = torch.zeros(buf.numel, dtype=torch.bool)
    for s, e in buf.param_range.values():
        covered[s:e] = True
    assert not buf.grad_data[~covered].any()
