"""Optimizer state dicts: pieces described by (parameter name, flat range) load at any layout."""

import copy

import pytest
import torch

from megacore.distributed import DistributedDataParallel
from megacore.optim.optimizer import MixedPrecisionOptimizer
from tests.distributed.common import HP, build_model, global_batch
from tests.distributed.conftest import case


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_shards_load_into_replicated_optimizer(world):
    """DP-sharded state saved after 3 steps, all ranks' pieces loaded into a replicated optimizer,
    3 more steps: equals 6 uninterrupted single-rank steps."""
    for r in case(world, "reshard"):
        assert r["num_steps"] == 6
        assert r["num_saved_pieces"] > 26  # more pieces than parameters: some straddle shard boundaries
        assert r["global_err"] <= 1e-6, r
        assert r["param_err"] <= 1e-5, r


def _train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        tokens, labels = global_batch(step)
        opt.zero_grad()
        (model(tokens, labels=labels, reduction="sum") / int((labels != -100).sum())).backward()
        if hasattr(model, "finish_grad_sync"):
            model.finish_grad_sync()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    model = DistributedDataParallel(build_model(dtype))
    opt = MixedPrecisionOptimizer(model, clip_grad=1.0, **HP)
    _train(model, opt, 2)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())

    other = DistributedDataParallel(build_model(dtype))
    other.load_state_dict(saved_model)
    opt2 = MixedPrecisionOptimizer(other, clip_grad=1.0, **HP)
    opt2.load_state_dict(saved)
    assert opt2.num_steps == 2
    _train(model, opt, 2, first=2)
    _train(other, opt2, 2, first=2)
    for (n, a), b in zip(model.module.named_parameters(), other.module.parameters()):
        assert torch.equal(a, b), n
    for fa, fb in zip(opt.fragments, opt2.fragments):
        assert torch.equal(fa.master, fb.master), fa.name


def test_state_dict_is_plain_tensors_and_metadata():
    model = DistributedDataParallel(build_model(torch.bfloat16))
    opt = MixedPrecisionOptimizer(model, **HP)
    sd = opt.state_dict()
    assert sd["format"] == "megacore.optimizer.v1" and sd["step"] == 0
    names = {n for n, _ in model.module.named_parameters()}
    for s in sd["shards"]:
        assert s["name"] in names and (s["start"], s["end"]) == (0, int(torch.Size(s["shape"]).numel()))
        assert s["master"].dtype == torch.float32 and s["exp_avg"].shape == s["master"].shape
    entries = opt.checkpoint_entries()
    assert {e.state_name for e in entries} == {"master", "exp_avg", "exp_avg_sq"}


def test_incomplete_state_dict_is_rejected_with_a_clear_message():
    model = DistributedDataParallel(build_model())
    opt = MixedPrecisionOptimizer(model, **HP)
    sd = opt.state_dict()
    first = sd["shards"][0]
    sd["shards"][0] = dict(first, end=first["end"] // 2, exp_avg=first["exp_avg"][: first["end"] // 2],
                           exp_avg_sq=first["exp_avg_sq"][: first["end"] // 2])
    with pytest.raises(ValueError, match="does not cover"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict({"shards": []})
