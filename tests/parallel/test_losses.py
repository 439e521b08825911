"""Vocab-parallel cross entropy against F.cross_entropy on the full logits (value and gradient)."""

import pytest
import torch
import torch.nn.functional as F

import megacore.parallel as P
from megacore.layers.output_head import cross_entropy
from megacore.parallel.vocab_parallel import vocab_parallel_cross_entropy
from tests.dist.harness import run_distributed


def _reference(full_logits, labels, vocab_valid, smoothing, upstream):
    """F.cross_entropy over the real columns (fp64); returns loss and d(Σ upstream·loss)/dlogits."""
    logits = full_logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(logits[..., :vocab_valid].reshape(-1, vocab_valid), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing, reduction="none").view(labels.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), logits.grad


def _data(seed, vocab_padded, vocab_valid, shape=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab_padded, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab_valid, shape, generator=g)
    labels[0, :2] = -100
    labels[1, -1] = vocab_valid - 1  # the last real column
    upstream = torch.rand(shape, generator=g, dtype=torch.float64)
    return logits, labels, upstream


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_single_device_matches_f_cross_entropy(smoothing):
    logits, labels, upstream = _data(0, 24, 21)
    ref_loss, ref_grad = _reference(logits, labels, 21, smoothing, upstream)
    for fn in (lambda x: vocab_parallel_cross_entropy(x, labels, None, 0, 21, label_smoothing=smoothing),
               lambda x: cross_entropy(x, labels, 21, label_smoothing=smoothing)):
        x = logits.clone().requires_grad_(True)
        loss = fn(x)
        (loss * upstream).sum().backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, ref_grad, rtol=1e-6, atol=1e-6)
        assert x.grad[..., 21:].abs().max() == 0  # padding columns get no mass
        assert (loss[0, :2] == 0).all()


def test_backward_passes_gradcheck():
    logits, labels, _ = _data(1, 6, 5, shape=(2, 3))
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: vocab_parallel_cross_entropy(t, labels, None, 0, 5, label_smoothing=0.2), (x,))


def test_bad_arguments_raise_clear_errors():
    logits, labels, _ = _data(2, 8, 8)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits[:, :3], labels, None, 0, 8)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_cross_entropy(logits, labels, None, 4, 8)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits, labels, None, 0, 8, label_smoothing=1.5)


def _tp_cases(rank, world):
    failures = []
    for tensor in (world, 2):
        state = P.initialize(tensor=tensor)
        t, r = state.tp_size, state.tp_rank
        # 37 real columns padded to 40 (not divisible by 3 .. fine: 40 % 4 == 0); 5 real columns leave
        # whole shards of padding; 40 is the no-padding case.
        for vocab_valid in (37, 5, 40):
            for smoothing in (0.0, 0.1):
                for dtype in (torch.float64, torch.float32):
                    logits, labels, upstream = _data(vocab_valid + tensor, 40, vocab_valid)
                    ref_loss, ref_grad = _reference(logits, labels, vocab_valid, smoothing, upstream)
                    v = 40 // t
                    local = logits[..., r * v:(r + 1) * v].to(dtype).clone().requires_grad_(True)
                    loss = vocab_parallel_cross_entropy(local, labels, state.tp_group, r * v, vocab_valid,
                                                        label_smoothing=smoothing)
                    (loss * upstream.to(loss.dtype)).sum().backward()
                    tol = 1e-10 if dtype == torch.float64 else 2e-5
                    tag = f"tensor={tensor} valid={vocab_valid} eps={smoothing} {dtype}"
                    if not torch.allclose(loss.double(), ref_loss, rtol=tol, atol=tol):
                        failures.append(f"{tag}: loss off by {(loss.double() - ref_loss).abs().max():.3g}")
                    want = ref_grad[..., r * v:(r + 1) * v]
                    if not torch.allclose(local.grad.double(), want, rtol=tol, atol=tol):
                        failures.append(f"{tag}: grad off by {(local.grad.double() - want).abs().max():.3g}")
        P.destroy()
    return failures


def test_vocab_parallel_matches_full_cross_entropy():
    results = run_distributed(_tp_cases, world_size=4)
    assert results == [[]] * 4, results
