"""Loss scaling: the dynamic scaler's schedule, unscaling with inf/nan detection, and fp16 DP training
where one rank's overflow makes every rank skip the step and back off, then training recovers."""

import math

import pytest
import torch

from megacore.precision import ConstantLossScaler, DynamicLossScaler, unscale_and_check_
from tests.distributed.conftest import case


def _grad_scaler_scales(pattern, init, interval):
    """Scale after each step from torch.amp.GradScaler driven by the same overflow pattern."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=interval)
    out = []
    for overflow in pattern:
        scaler.scale(torch.ones(()))  # initializes the scale, as scaling the loss would
        p.grad = torch.full((3,), float("inf") if overflow else 1.0)
        scaler.step(opt)
        scaler.update()
        out.append(scaler.get_scale())
    return out


def test_dynamic_scaler_without_hysteresis_matches_torch_grad_scaler():
    pattern = [False] * 5 + [True] + [False] * 7 + [True, True] + [False] * 4
    ours = DynamicLossScaler(initial_scale=2.0 ** 10, growth_interval=3, hysteresis=1)
    scales = []
    for overflow in pattern:
        ours.update(overflow)
        scales.append(ours.scale)
    assert scales == _grad_scaler_scales(pattern, 2.0 ** 10, 3)


def test_hysteresis_delays_backoff_until_it_is_used_up():
    s = DynamicLossScaler(initial_scale=1024.0, growth_interval=100, hysteresis=2, min_scale=256.0)
    s.update(True)
    assert s.scale == 1024.0  # first overflow absorbed by hysteresis
    s.update(False)
    s.update(True)
    assert s.scale == 512.0   # tracker only refills on growth, so the second overflow backs off
    s.update(True)
    assert s.scale == 256.0
    s.update(True)
    assert s.scale == 256.0   # clamped at min_scale
    state = s.state_dict()
    t = DynamicLossScaler(initial_scale=1024.0, hysteresis=2)
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_unscale_detects_inf_and_nan_and_unscales():
    grads = [torch.tensor([2.0, 4.0]), torch.tensor([8.0])]
    assert not unscale_and_check_(grads, 0.5)
    assert torch.equal(grads[0], torch.tensor([1.0, 2.0])) and torch.equal(grads[1], torch.tensor([4.0]))
    assert unscale_and_check_([torch.tensor([1.0, float("nan")])], 1.0)
    assert unscale_and_check_([torch.tensor([1.0]), torch.tensor([float("-inf")], dtype=torch.bfloat16)], 1.0)


def test_bad_scaler_arguments_name_the_fix():
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match="hysteresis"):
        DynamicLossScaler(hysteresis=0)
    with pytest.raises(ValueError, match="positive"):
        ConstantLossScaler(0.0)


@pytest.mark.parametrize("kind", ["replicated", "distopt", "replicated_fused", "distopt_fused"])
def test_fp16_overflow_on_one_rank_skips_everywhere_and_recovers(kind):
    """``*_fused``: torch's fused AdamW, where clipping runs inside the kernel after the unscale."""
    for r in case(2, f"fp16/overflow/{kind}"):
        assert r["skipped"] == [False, False, False, True] + [False] * 6
        s = r["scales"]
        assert s[2] == 2 * s[1]          # grew after growth_interval=3 good steps
        assert s[3] == s[2] / 2          # backed off at the injected overflow (hysteresis=1)
        assert s[6] == 2 * s[3]          # and grows again after 3 good steps
        assert r["ranks_identical"] and r["finite"]
        assert all(math.isfinite(x) for x in r["losses"])


@pytest.mark.parametrize("kind", ["replicated", "distopt"])
def test_fp16_skipped_step_leaves_weights_and_moments_untouched(kind):
    for r in case(2, f"fp16/skip/{kind}"):
        assert r["skipped"] == [True, True]
        assert r["scales"] == [1024.0, 512.0]  # hysteresis=2: the second overflow backs off
        assert r["params_unchanged"] and r["moments_unchanged"]
