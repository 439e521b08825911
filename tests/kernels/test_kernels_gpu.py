"""Compiled Triton kernels at realistic shapes on a CUDA GPU (skipped without one).

Each compares the Triton path with the torch reference on the same bf16 inputs (forward and every
gradient) by relative Frobenius error ‖a − b‖ / ‖b‖ against an fp32 computation; bf16 bound 1e-2
(one bf16 rounding is 2^-9 ≈ 2e-3 relative). The fused CE is also checked for peak memory.
"""

import pytest
import torch
import torch.nn.functional as F

from megacore.kernels import (
    apply_rotary,
    apply_rotary_reference,
    fused_linear_cross_entropy,
    gated_activation,
    gated_activation_reference,
    rms_norm,
    rms_norm_reference,
)

pytestmark = pytest.mark.gpu
BF16_REL = 1e-2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _fwd_bwd(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs if o.requires_grad], [g for o, g in zip(outs, grads_out)
                                                                      if o.requires_grad])
    return list(outs), [t.grad for t in leaves if t.requires_grad]


def _compare(fast, ref, inputs, grads_out, bound, fp32_inputs=None):
    """fast vs (ref on fp32 copies of the inputs): every output and every input gradient."""
    f_out, f_grad = _fwd_bwd(fast, inputs, grads_out)
    ref_inputs = fp32_inputs or [t.float().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                                 for t in inputs]
    r_out, r_grad = _fwd_bwd(ref, ref_inputs, [g.float() for g in grads_out])
    for i, (a, b) in enumerate(zip(f_out, r_out)):
        assert _rel(a, b) < bound, f"output {i}: rel err {_rel(a, b):.2e}"
    for i, (a, b) in enumerate(zip(f_grad, r_grad)):
        assert _rel(a, b) < bound, f"grad {i}: rel err {_rel(a, b):.2e}"


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rmsnorm_8192x2048_bf16(zero_centered):
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = (torch.rand(2048, device="cuda") + 0.5).requires_grad_()
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    _compare(lambda x, w, r: rms_norm(x, w, 1e-5, r, zero_centered),
             lambda x, w, r: rms_norm_reference(x, w, 1e-5, r, zero_centered), [x, w, r], [gy, gh], BF16_REL)


@pytest.mark.parametrize("rotary_dim", [128, 64])
@pytest.mark.parametrize("with_positions", [False, True])
def test_rope_4x2048x16x128_bf16(rotary_dim, with_positions):
    b, s, h, d = 4, 2048, 16, 128
    x = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = 4096 if with_positions else s
    theta = torch.arange(rows, device="cuda")[:, None] * 10000 ** (-torch.arange(0, rotary_dim, 2, device="cuda")
                                                                    / rotary_dim)
    emb = torch.cat([theta, theta], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    pos = torch.randint(0, rows, (b, s), device="cuda") if with_positions else None
    _compare(lambda x: apply_rotary(x, cos, sin, rotary_dim, pos),
             lambda x: apply_rotary_reference(x, cos.float(), sin.float(), rotary_dim, pos), [x],
             [torch.randn_like(x)], BF16_REL)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_8192x5632x2_bf16(activation):
    x = torch.randn(8192, 2 * 5632, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _compare(lambda x: gated_activation(x, activation), lambda x: gated_activation_reference(x, activation), [x],
             [torch.randn(8192, 5632, device="cuda", dtype=torch.bfloat16)], BF16_REL)


def test_fused_ce_8192x2048x32000_bf16_matches_plain_and_saves_memory():
    n, d, v, k = 8192, 2048, 32000, 31900
    h = (torch.randn(n, d, device="cuda") ).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(v, d, device="cuda")).bfloat16().requires_grad_()
    y = torch.randint(0, k, (n,), device="cuda")
    y[::7] = -100

    def plain(h, w):
        return F.cross_entropy(F.linear(h, w)[:, :k].float(), y, ignore_index=-100)

    def fused(h, w):
        return fused_linear_cross_entropy(h, w, y, vocab_valid=k)

    results = {}
    for name, fn in [("plain", plain), ("fused", fused), ("plain", plain), ("fused", fused)]:  # 2nd round: warm
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(hh, ww)
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (loss.detach(), hh.grad, ww.grad, torch.cuda.max_memory_allocated() - base)
    lp, lf = results["plain"][0], results["fused"][0]
    assert abs(lf.item() - lp.item()) < 1e-3 * abs(lp.item()), (lf.item(), lp.item())
    assert _rel(results["fused"][1], results["plain"][1]) < BF16_REL
    assert _rel(results["fused"][2], results["plain"][2]) < BF16_REL
    assert results["fused"][2][k:].abs().max() == 0
    # plain holds bf16 + fp32 logits and their fp32 gradient (>= 2 GB); fused holds one chunk + fp32 dW.
    assert results["fused"][3] < 0.5 * results["plain"][3], (results["fused"][3], results["plain"][3])


def test_fused_ce_none_reduction_recompute_path_bf16():
    n, d, v = 4096, 1024, 32000
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(v, d, device="cuda")).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    g = torch.rand(n, device="cuda")
    _compare(lambda h, w: fused_linear_cross_entropy(h, w, y, reduction="none", label_smoothing=0.1),
             lambda h, w: F.cross_entropy(F.linear(h, w).float(), y, reduction="none", label_smoothing=0.1),
             [h, w], [g], BF16_REL)
