"""Single-process checks of the grad buffer, DDP hooks and the mixed-precision optimizer."""

import contextlib

import pytest
import torch
from torch import nn

from megacore.distributed import DistributedDataParallel, GradBuffer
from megacore.optim import DistributedOptimizer
from megacore.distributed.grad_buffer import ALIGN, settled_main_grad
from megacore.optim.optimizer import MixedPrecisionOptimizer, weight_decay_groups
from tests.distributed.common import build_model, global_batch


def _loss(model, tokens, labels, n):
    return model(tokens, labels=labels, reduction="sum") / n


def test_layout_reverse_order_aligned_views_and_buckets():
    model = build_model()
    params = [p for p in model.parameters()]
    buf = GradBuffer(params, grad_dtype=torch.float32, bucket_numel=3000)
    starts = [buf.param_range[id(p)][0] for p in params]
    assert starts == sorted(starts, reverse=True)  # last registered parameter first
    assert all(s % ALIGN == 0 for s in starts)
    for p in params:
        s, e = buf.param_range[id(p)]
        assert p.main_grad.data_ptr() == buf.grad_data[s:].data_ptr() and p.main_grad.shape == p.shape
    assert len(buf.buckets) > 1
    assert buf.buckets[0].start == 0 and buf.buckets[-1].end == buf.numel
    assert all(a.end == b.start for a, b in zip(buf.buckets, buf.buckets[1:]))
    assert all(b.numel >= 3000 for b in buf.buckets[:-1])
    assert sorted(id(p) for b in buf.buckets for p in b.params) == sorted(id(p) for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_batches_accumulate_in_fp32_main_grad_and_free_grad(dtype):
    tokens, labels = global_batch(0)
    n = int((labels != -100).sum())
    ref = build_model(dtype)
    expected = {name: torch.zeros(p.shape) for name, p in ref.named_parameters()}
    for i in range(0, 8, 4):  # the same two micro-batches, plain autograd, summed in fp32
        ref.zero_grad(set_to_none=True)
        _loss(ref, tokens[i:i + 4], labels[i:i + 4], n).backward()
        for name, p in ref.named_parameters():
            expected[name] += p.grad.float()

    ddp = DistributedDataParallel(build_model(dtype), bucket_size_mb=0.004)
    launched = []
    for i in range(0, 8, 4):
        with ddp.no_sync() if i == 0 else contextlib.nullcontext():
            _loss(ddp, tokens[i:i + 4], labels[i:i + 4], n).backward()
        launched.append([b.grad_launched for buf in ddp.grad_buffers for b in buf.buckets])
    assert not any(launched[0])   # no_sync: nothing launched
    assert all(launched[1])       # the last backward launched every bucket from its hooks
    ddp.finish_grad_sync()
    for name, p in ddp.module.named_parameters():
        assert p.grad is None
        assert p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, expected[name], rtol=1e-6, atol=1e-9)
    ddp.zero_grad_buffer()  # lazy: every main_grad is marked stale and reads as zeros once settled
    assert all(buf.stale == {id(p) for p in buf.params} for buf in ddp.grad_buffers)
    assert all(not settled_main_grad(p).any() for p in ddp.module.parameters())


def test_fp32_optimizer_equals_torch_adamw():
    model, ref = build_model(), build_model()
    ours = MixedPrecisionOptimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(weight_decay_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95))
    for step in range(3):
        tokens, labels = global_batch(step)
        for m, opt in ((model, ours), (ref, theirs)):
            opt.zero_grad()
            _loss(m, tokens, labels, 100).backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_fp32_masters_keep_updates_bf16_weights_would_lose():
    """An update far below bf16 resolution: plain bf16 AdamW never moves the weight, the fp32 master does."""
    def run(master_weights):
        w = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
        nn.init.constant_(w.weight, 1.0)
        opt = MixedPrecisionOptimizer(w, lr=1e-4, master_weights=master_weights)
        for _ in range(100):
            w.weight.grad = torch.ones_like(w.weight)
            opt.step()
        return float(w.weight.detach()), float(opt.fragments[0].master)
    assert run(False)[0] == 1.0                      # each 1e-4 step rounds back to 1.0 in bf16
    weight, master = run(True)
    assert master == pytest.approx(1.0 - 100 * 1e-4, rel=1e-4)
    assert weight == float(torch.tensor(master).to(torch.bfloat16))


def test_weight_decay_groups_exclude_biases_and_norms():
    model = build_model()
    decay, no_decay = weight_decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"decoder.final_norm.weight", "decoder.final_norm.bias",
                                                          "decoder.layers.0.mlp.linear_fc1.bias"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_clear_errors():
    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        DistributedOptimizer(build_model())
    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        DistributedOptimizer(DistributedDataParallel(build_model()))
    with pytest.raises(ValueError, match="use DistributedOptimizer"):
        MixedPrecisionOptimizer(DistributedDataParallel(build_model(), use_distributed_optimizer=True))
    with pytest.raises(ValueError, match="without trainable parameters"):
        DistributedDataParallel(nn.ReLU())
    with pytest.raises(ValueError, match="bucket_size_mb"):
        DistributedDataParallel(build_model(), bucket_size_mb=-1)
    with pytest.raises(ValueError, match="clip_grad"):
        MixedPrecisionOptimizer(build_model(), clip_grad=-1.0)


def test_gradient_after_bucket_launch_is_an_error():
    lin = nn.Linear(4, 4)
    ddp = DistributedDataParallel(lin, bucket_size_mb=None)
    ddp(torch.randn(2, 4)).sum().backward()      # launches the only bucket
    with pytest.raises(RuntimeError, match="after its bucket's reduction"):
        ddp.grad_buffers[0].mark_ready(lin.weight)


def test_finish_is_idempotent_and_a_missing_zero_grad_is_caught():
    lin = nn.Linear(4, 4)
    ddp = DistributedDataParallel(lin, bucket_size_mb=None)
    ddp(torch.ones(2, 4)).sum().backward()
    ddp.finish_grad_sync()
    before = lin.weight.main_grad.clone()
    ddp.finish_grad_sync()  # e.g. the optimizer's step() calling it again: no second reduction
    assert torch.equal(lin.weight.main_grad, before)
    with pytest.raises(RuntimeError, match="zero_grad_buffer"):
        ddp(torch.ones(2, 4)).sum().backward()
    ddp.zero_grad_buffer()
    ddp(torch.ones(2, 4)).sum().backward()  # fine after zeroing


def test_optimizer_steps_several_model_chunks_together():
    chunks = [DistributedDataParallel(nn.Linear(4, 4)), DistributedDataParallel(nn.Linear(4, 2))]
    ref = [nn.Linear(4, 4), nn.Linear(4, 2)]
    for r, c in zip(ref, chunks):
        r.load_state_dict(c.module.state_dict())
    opt = MixedPrecisionOptimizer(chunks, lr=0.1, clip_grad=0.01)
    ref_opt = torch.optim.AdamW([p for r in ref for p in r.parameters()], lr=0.1, weight_decay=0.0)
    x = torch.randn(3, 4)
    chunks[1](chunks[0](x)).pow(2).sum().backward()
    ref[1](ref[0](x)).pow(2).sum().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_([p for r in ref for p in r.parameters()], 0.01)
    info = opt.step()
    ref_opt.step()
    assert info.grad_norm == pytest.approx(float(ref_norm), rel=1e-6)
    for r, c in zip(ref, chunks):
        for a, b in zip(r.parameters(), c.module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_parallel_groups_before_initialize_are_single_process_defaults():
    from megacore.distributed import parallel_groups

    assert parallel_groups() == {"dp_group": None, "expert_dp_group": None, "model_parallel_groups": (),
                                 "tp_group": None}
