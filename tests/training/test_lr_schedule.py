"""LR schedules against their closed forms."""

import math

import pytest

from megacore.config import TrainConfig
from megacore.training.lr_schedule import LRSchedule


def cfg(style, **kw):
    base = dict(iters=100, lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_style=style)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_is_linear_from_lr_over_warmup():
    s = LRSchedule(cfg("cosine"))
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])


@pytest.mark.parametrize("style,expected", [
    ("cosine", lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))),
    ("linear", lambda p: 0.1 + 0.9 * (1 - p)),
    ("constant", lambda p: 1.0),
    ("wsd", lambda p: 1.0 if p <= 0.8 else 0.1 + 0.9 * (1 - (p - 0.8) / 0.2)),
])
def test_decay_matches_closed_form(style, expected):
    s = LRSchedule(cfg(style, wsd_decay_fraction=0.2))
    for step in range(10, 130):
        p = min((step - 10) / 90, 1.0)
        assert s(step) == pytest.approx(expected(p), abs=1e-12), (style, step)


def test_decay_ends_at_min_lr_and_stays():
    s = LRSchedule(cfg("cosine", lr_decay_iters=50))
    assert s(50) == pytest.approx(0.1) and s(99) == pytest.approx(0.1)


def test_apply_sets_every_group():
    class Opt:
        param_groups = [{"lr": 0.0}, {"lr": 5.0}]

    opt = Opt()
    LRSchedule(cfg("linear")).apply(opt, 3)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.4]
