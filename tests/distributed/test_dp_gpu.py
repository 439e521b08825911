"""GPU checks of the single-device path of DDP + MixedPrecisionOptimizer (fused AdamW on CUDA)."""

import pytest
import torch

from megacore.distributed import DistributedDataParallel
from megacore.optim.optimizer import MixedPrecisionOptimizer
from tests.distributed.common import HP, build_model, global_batch

pytestmark = pytest.mark.gpu


def _run(fused: bool, steps: int = 3):
    model = DistributedDataParallel(build_model().cuda().to(torch.bfloat16), bucket_size_mb=0.004)
    opt = MixedPrecisionOptimizer(model, clip_grad=1.0, fused=fused, foreach=None if fused else True, **HP)
    norms = []
    for step in range(steps):
        tokens, labels = (t.cuda() for t in global_batch(step))
        opt.zero_grad()
        (model(tokens, labels=labels, reduction="sum") / int((labels != -100).sum())).backward()
        norms.append(opt.step().grad_norm)
    return opt, norms


def test_fused_and_foreach_adamw_agree_on_cuda_masters():
    fused, n_fused = _run(True)
    foreach, n_foreach = _run(False)
    assert fused.optimizer.param_groups[0].get("fused")
    assert all(f.master.dtype == torch.float32 and f.master.is_cuda for f in fused.fragments)
    assert n_fused == pytest.approx(n_foreach, rel=1e-5)
    for a, b in zip(fused.fragments, foreach.fragments):
        torch.testing.assert_close(a.master, b.master, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.param.data, a.master.to(torch.bfloat16).view_as(a.param))
