"""Global grad-norm clipping: equals torch.nn.utils.clip_grad_norm_ on the single-rank model, counts
TP-replicated params once and distributed-optimizer shards exactly once, and never scales by a
non-finite norm."""

import math

import pytest
import torch

from megacore.distributed import clip_grad_norm
from tests.distributed.common import build_model, global_batch
from tests.distributed.conftest import case


def _model_with_grads():
    model = build_model()
    tokens, labels = global_batch(0)
    (model(tokens, labels=labels, reduction="sum") / int((labels != -100).sum())).backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_single_rank_matches_torch(norm_type, max_norm):
    ours, ref = _model_with_grads(), _model_with_grads()
    n_ours = clip_grad_norm(ours.parameters(), max_norm, norm_type=norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type)
    assert float(n_ours) == pytest.approx(float(n_ref), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_uses_main_grad_when_present():
    ours, ref = _model_with_grads(), _model_with_grads()
    for p in ours.parameters():
        p.main_grad, p.grad = p.grad.clone(), None
    n = clip_grad_norm(ours.parameters(), 0.05)
    assert float(n) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.main_grad, b.grad, rtol=1e-6, atol=0)


def test_nonfinite_norm_is_returned_and_never_used_to_scale():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("inf"), 2.0])
    n = clip_grad_norm([p], 1.0)
    assert math.isinf(float(n))
    assert p.grad[0] == 1.0 and p.grad[2] == 2.0  # not multiplied by 0 or nan
    with pytest.raises(RuntimeError, match="inf/nan"):
        clip_grad_norm([p], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("norm_type", ["2.0", "inf"])
def test_tp2_dp2_layout_counts_every_element_once(norm_type):
    """4 ranks as TP=2 x DP=2: sharded matrices, TP-replicated vectors, DP flat shards and a tied
    duplicate; the norm and every clipped piece equal torch's on the full model."""
    for per_rank in case(4, "gradnorm/tp_dp"):
        r = per_rank[norm_type]
        assert r["norm"] == pytest.approx(r["ref"], rel=1e-6)
        assert r["clip_err"] <= 1e-9


@pytest.mark.parametrize("kind", ["replicated", "distopt"])
@pytest.mark.parametrize("impl", ["unfused", "fused"])
def test_nonfinite_norm_skips_the_step_on_every_rank(kind, impl):
    """No loss scaler: a NaN gradient (in rank 0's shard only, for the distributed optimizer) gives
    a NaN global norm everywhere, every rank skips (weights, moments and AdamW's step counter
    untouched), the next step trains. Fused: the skip is decided inside the AdamW kernel and
    nothing is read from the device until asked."""
    for r in case(2, f"nonfinite/{kind}/{impl}"):
        assert r["skipped"] == [True, False], r
        assert r["norm_finite"] == [False, True], r
        assert r["params_unchanged"] and r["state_unchanged"], r
        assert r["unread_after_step"] == (impl == "fused"), r
        assert r["num_steps"] == 2, r  # steps 1 and 3 applied; the skipped one is not counted
        assert r["ranks_identical"] and r["moved_after"], r
