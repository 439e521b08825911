"""Fused linear + cross entropy vs F.cross_entropy on full logits (fp64), single rank and 2-rank vocab-parallel."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference, triton_available
from tests.dist.harness import run_distributed
from tests.kernels.helpers import DEVICE, TOL, assert_close, needs_triton

N, D, V, K = 37, 16, 56, 50  # 37 tokens (chunks of 8 leave a ragged tail), vocab 50 padded to 56
IGNORE = -100

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _data(seed, n=N, v=V, k=K, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen).to(device, dtype)
    w = (0.5 * torch.randn(v, D, generator=gen)).to(device, dtype)
    y = torch.randint(0, k, (n,), generator=gen)
    y[::5] = IGNORE
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, w, y.to(device), g.to(device)


def _plain_fp64(h, w, y, k, reduction, eps, g):
    """F.cross_entropy on the full fp64 logits restricted to the first k columns; returns loss, dh, dW."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    loss = F.cross_entropy(F.linear(h64, w64)[:, :k], y, ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=eps)
    (loss * g).sum().backward() if reduction == "none" else (loss * g[0]).backward()
    return loss, h64.grad, w64.grad


def _fused(h, w, y, reduction, eps, g, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction=reduction, label_smoothing=eps, **kw)
    (loss.double() * g).sum().backward() if reduction == "none" else (loss.double() * g[0]).backward()
    return loss, h.grad, w.grad


PATHS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_ce_matches_full_logits_fp64(path, reduction, eps):
    dev = DEVICE if path == "triton" else "cpu"
    h, w, y, g = _data(0, device=dev)
    got = _fused(h, w, y, reduction, eps, g, vocab_valid=K, chunk_size=8, force_triton=path == "triton")
    want = _plain_fp64(h, w, y, K, reduction, eps, g)
    for name, a, b in zip(["loss", "dhidden", "dweight"], got, want):
        assert_close(a, b, 1e-5, f"{name} ({path}, {reduction}, eps={eps})")
    assert got[2][K:].abs().max() == 0, "padding rows of the weight must get no gradient"
    if reduction == "none":
        assert (got[0][y == IGNORE] == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_fused_ce_bf16_matches_plain_bf16_logits(path):
    """bf16 hidden/weight: loss within 1e-2 of CE over the same bf16 logits in fp64; grads within TOL[bf16]."""
    dev = DEVICE if path == "triton" else "cpu"
    h, w, y, g = _data(1, dtype=torch.bfloat16, device=dev)
    got = _fused(h, w, y, "mean", 0.0, g, vocab_valid=K, chunk_size=16, force_triton=path == "triton")
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    want = _plain_fp64(h, w, y, K, "mean", 0.0, g)
    for name, a, b in zip(["loss", "dhidden", "dweight"], got, want):
        assert_close(a, b, TOL[torch.bfloat16], f"{name} bf16 ({path})")


def test_fused_ce_shapes_reference_and_frozen_weight():
    """[B, S, D] input, no_grad inference, frozen weight, and the public reference agree with plain CE."""
    h, w, y, g = _data(2)
    h3, y3 = h[:36].view(4, 9, D), y[:36].view(4, 9)
    loss = fused_linear_cross_entropy(h3, w, y3, vocab_valid=K, reduction="none", chunk_size=5)
    assert loss.shape == (4, 9)
    ref = linear_cross_entropy_reference(h3.double(), w.double(), y3, vocab_valid=K, reduction="none")
    assert_close(loss, ref, 1e-5, "3-D per-token loss")
    with torch.no_grad():
        inference = fused_linear_cross_entropy(h, w, y, vocab_valid=K)
    assert_close(inference, _plain_fp64(h, w, y, K, "mean", 0.0, g)[0], 1e-5, "no_grad mean")
    hr = h.clone().requires_grad_()
    fused_linear_cross_entropy(hr, w, y, vocab_valid=K, reduction="sum").backward()
    assert_close(hr.grad, _plain_fp64(h, w, y, K, "sum", 0.0, torch.ones(1, dtype=torch.float64))[1], 1e-5,
                 "frozen-weight dhidden")


def test_fused_ce_all_ignored_and_errors():
    h, w, y, _ = _data(3)
    hr = h.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hr, w, torch.full_like(y, IGNORE), vocab_valid=K)
    loss.backward()
    assert loss.item() == 0.0 and hr.grad.abs().max() == 0
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(h, w, torch.full_like(y, K), vocab_valid=K)  # a padding column as label
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="cast one"):
        fused_linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="needs tp_group"):
        fused_linear_cross_entropy(h, w, y, vocab_start=8)


def _tp_cases(rank, world, paths):
    """Each rank holds vocab rows [rank·V/2, (rank+1)·V/2); compare with one-rank full-vocab fp64 CE."""
    group = dist.new_group(list(range(world)))
    failures = []
    # (vocab_valid K): 50 pads inside rank 1's shard; 27 leaves rank 1 with no real column at all.
    for path in paths:
        for k, reduction, eps in [(K, "mean", 0.0), (K, "none", 0.1), (K, "sum", 0.1), (27, "mean", 0.1),
                                  (V, "none", 0.0)]:
            h, w, y, g = _data(10 + k, k=k)
            shard = V // world
            lo = rank * shard
            want = _plain_fp64(h, w, y, k, reduction, eps, g)
            for reduce_here in (False, True):
                got = _fused(h, w[lo:lo + shard], y, reduction, eps, g, vocab_valid=k, tp_group=group, vocab_start=lo,
                             chunk_size=16, reduce_grad_hidden=reduce_here, force_triton=path == "triton")
                dh = got[1].clone()
                if not reduce_here:  # the caller's copy-to-TP-region backward would do this sum
                    dist.all_reduce(dh, group=group)
                case = f"rank {rank} {path} k={k} {reduction} eps={eps} reduce_here={reduce_here}"
                for name, a, b in [("loss", got[0], want[0]), ("dhidden", dh, want[1]),
                                   ("dweight shard", got[2], want[2][lo:lo + shard])]:
                    try:
                        assert_close(a, b, 1e-5, f"{name} {case}")
                    except AssertionError as e:
                        failures.append(str(e))
    return failures


def test_fused_ce_vocab_parallel_two_ranks_matches_full_vocab():
    """2 gloo ranks, torch path and (through the interpreter) the Triton path, one spawn for both."""
    paths = ["torch"]
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":  # spawned ranks inherit the variable
        paths.append("triton")
    results = run_distributed(_tp_cases, world_size=2, args=(paths,))
    assert results == [[], []], "\n".join(sum(results, []))
