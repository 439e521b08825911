"""RNG tracker: stream seeds, fork isolation, state save/restore, replay under recomputation, and
dropout masks identical across TP ranks where replicated, different where split."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_ckpt

import megacore.parallel as P
from megacore.parallel import rng
from tests.dist.harness import run_distributed


@pytest.fixture(autouse=True)
def _fresh_tracker():
    saved = torch.get_rng_state()
    rng.get_rng_tracker().reset()
    yield
    rng.get_rng_tracker().reset()
    torch.set_rng_state(saved)


def test_fork_without_streams_is_a_no_op():
    torch.manual_seed(0)
    with P.fork():
        a = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(4))


def test_stream_seeds_follow_the_documented_rule():
    P.model_parallel_seed(11)  # single rank: tp_rank = pp_rank = 0
    assert rng.stream_seed(rng.TP_STREAM) == 11 + 2718
    with P.fork("tensor-parallel"):
        tp_draw = torch.rand(5)
    default_draw = torch.rand(5)
    assert torch.equal(tp_draw, torch.rand(5, generator=torch.Generator().manual_seed(11 + 2718)))
    assert torch.equal(default_draw, torch.rand(5, generator=torch.Generator().manual_seed(11)))


def test_fork_restores_caller_state_and_advances_its_stream():
    P.model_parallel_seed(3)
    before = torch.get_rng_state()
    with P.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # caller's stream untouched
    with P.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the stream continued, it did not restart
    ref = torch.Generator().manual_seed(3 + 2718)
    assert torch.equal(torch.cat([first, second]), torch.rand(6, generator=ref))
    with pytest.raises(KeyError, match="model_parallel_seed"):
        with P.fork("no-such-stream"):
            pass


def test_get_set_all_states_round_trip():
    P.model_parallel_seed(5)
    saved = P.get_all_rng_states()
    a = torch.rand(2)
    with P.fork():
        b = torch.rand(2)
    P.set_all_rng_states(saved)
    assert torch.equal(torch.rand(2), a)
    with P.fork():
        assert torch.equal(torch.rand(2), b)


def _dropout_region(x):
    """Default-stream dropout, then tensor-parallel-stream dropout, then a nonlinearity."""
    y = F.dropout(x, 0.5, training=True)
    with P.fork():
        y = F.dropout(y * 2.0, 0.5, training=True)
    return torch.tanh(y) * x


def _grads(run, x):
    x = x.clone().requires_grad_(True)
    run(x).sum().backward()
    return x.grad


def test_recompute_replays_both_streams():
    x = torch.randn(64, 32)
    P.model_parallel_seed(9)
    state = P.get_all_rng_states()
    ref = _grads(_dropout_region, x)
    P.set_all_rng_states(state)
    replayed = _grads(lambda t: rng.checkpoint(_dropout_region, t), x)
    assert torch.equal(ref, replayed)
    after_ckpt = P.get_all_rng_states()
    # Streams end where the plain forward left them (recompute consumed nothing).
    P.set_all_rng_states(state)
    _grads(_dropout_region, x)
    plain_after = P.get_all_rng_states()
    tp = "tensor-parallel"
    assert torch.equal(after_ckpt["tracker"][tp]["cpu"], plain_after["tracker"][tp]["cpu"])
    # Control: torch's checkpoint alone restores only the default stream, so the forked mask changes.
    P.set_all_rng_states(state)
    broken = _grads(lambda t: torch_ckpt.checkpoint(_dropout_region, t, use_reentrant=False), x)
    assert not torch.equal(ref, broken)


def _tp_dropout_masks(rank, world):
    P.initialize(tensor=world)
    P.model_parallel_seed(1234)
    x = torch.ones(256)
    replicated = F.dropout(x, 0.5, training=True)
    with P.fork():
        split = F.dropout(x, 0.5, training=True)
    # Checkpointed TP region on this rank (replay must reproduce the same gradient).
    inp = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))
    state = P.get_all_rng_states()
    g_ref = _grads(_dropout_region, inp)
    P.set_all_rng_states(state)
    g_ckpt = _grads(lambda t: rng.checkpoint(_dropout_region, t), inp)
    P.destroy()
    # Plain lists: tensors would travel through shared memory that dies with the worker.
    return replicated.tolist(), split.tolist(), torch.equal(g_ref, g_ckpt)


def test_dropout_identical_where_replicated_different_where_split():
    (rep0, split0, ok0), (rep1, split1, ok1) = run_distributed(_tp_dropout_masks, world_size=2)
    assert rep0 == rep1
    assert split0 != split1
    assert 0 in rep0 and 0 in split0  # dropout did drop
    assert ok0 and ok1
