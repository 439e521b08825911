"""GPU: the Mamba-2 Triton kernels at the 1B layer shape (bf16) against the torch reference, and a hybrid
model through the kernels (eager and compiled) against the torch path.

Layer shape of the hybrid 1B (hidden 2048): 64 heads of 64 channels, 8 groups, state 128, chunk 128,
conv kernel 4 over 4096 + 2·8·128 = 6144 channels. Errors are relative Frobenius norms: the kernels
round their matrix-product operands to bf16 (as Mamba-2's kernels do) where the reference keeps fp32.
"""

import pytest
import torch
import torch.nn.functional as F

import megacore
from megacore.layers.mamba import MambaMixer
from megacore.kernels import kernel_backend
from megacore.kernels.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference
from megacore.kernels.ssd_scan import ssd_scan_triton
from megacore.layers.mamba import MambaState, ssd_chunked
from megacore.models.gpt import GPTModel
from megacore.training.compile import compile_model

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _scan_inputs(b=2, s=2048, h=64, p=64, g=8, n=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, s, h, p, device="cuda", generator=gen).bfloat16()
    dt = F.softplus(torch.randn(b, s, h, device="cuda", generator=gen) - 3)
    A = -torch.rand(h, device="cuda", generator=gen) * 8 - 1
    B = (torch.randn(b, s, g, n, device="cuda", generator=gen) * 0.3).bfloat16()
    C = (torch.randn(b, s, g, n, device="cuda", generator=gen) * 0.3).bfloat16()
    D = torch.ones(h, device="cuda")
    init = torch.randn(b, h, p, n, device="cuda", generator=gen) * 0.1
    return [x, dt, A, B, C, D, init]


@pytest.mark.parametrize("s", [2048, 1000])
def test_scan_1b_shape_bf16_matches_reference(s):
    inputs = _scan_inputs(s=s)
    outs = {}
    for name, fn in [("triton", ssd_scan_triton), ("torch", ssd_chunked)]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, final = fn(*leaves[:5], 128, D=leaves[5], initial_state=leaves[6])
        gen = torch.Generator(device="cuda").manual_seed(1)
        gy = torch.randn(y.shape, device="cuda", generator=gen)
        ((y.float() * gy).sum() + final.sum()).backward()
        outs[name] = [y, final] + [t.grad for t in leaves]
    for what, a, e in zip("y final dx ddt dA dB dC dD dinit".split(), outs["triton"], outs["torch"]):
        assert _rel(a, e) < 2e-2, (what, _rel(a, e))


def test_conv_1b_shape_bf16_matches_reference():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 2048, 6144, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(6144, 1, 4, device="cuda", generator=gen) * 0.5).bfloat16()
    bias = torch.randn(6144, device="cuda", generator=gen).bfloat16()
    outs = {}
    for name, fn in [("triton", lambda *a: causal_conv1d_silu(*a, force_triton=True)),
                     ("torch", causal_conv1d_silu_reference)]:
        leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
        y = fn(*leaves)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        outs[name] = [y] + [t.grad for t in leaves]
    for what, a, e in zip(["y", "dx", "dw", "dbias"], outs["triton"], outs["torch"]):
        assert _rel(a, e) < 1e-2, (what, _rel(a, e))


def _hybrid(seed=0):
    cfg = megacore.TransformerConfig(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                                     ffn_hidden_size=1408, vocab_size=5000, seq_length=512, layer_pattern="M*M-",
                                     mamba_num_groups=4)
    return cfg, GPTModel(cfg, seed=seed).cuda().to(torch.bfloat16)


def _run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_hybrid_model_kernels_match_torch_path_eager_and_compiled():
    cfg, model = _hybrid()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    labels = torch.roll(ids, -1, 1)
    with kernel_backend("torch"):
        ref_loss, ref_grads = _run(model, ids, labels)
    with kernel_backend("triton"):
        loss, grads = _run(model, ids, labels)
        assert abs(loss - ref_loss) / ref_loss < 1e-2
        for n, g in ref_grads.items():
            assert _rel(grads[n], g) < 5e-2, n
        torch._dynamo.reset()
        compile_model(model, fullgraph=True)  # the kernels are custom ops: no graph break
        for _ in range(2):
            c_loss, c_grads = _run(model, ids, labels)
        assert abs(c_loss - loss) / loss < 1e-2
        for n, g in grads.items():
            assert _rel(c_grads[n], g) < 5e-2, n


def test_mixer_decode_with_kernels_matches_full_forward():
    cfg, model = _hybrid(seed=2)
    mixer = next(m for m in model.modules() if isinstance(m, MambaMixer)).float()
    hidden = torch.randn(2, 300, cfg.hidden_size, device="cuda") * 0.5
    with torch.no_grad(), kernel_backend("torch"):
        full = mixer(hidden)
    with torch.no_grad(), kernel_backend("triton"):
        state = MambaState(mixer.conv1d.kernel_size[0])
        got = [mixer(hidden[:, :290], state)] + [mixer(hidden[:, t:t + 1], state) for t in range(290, 300)]
    assert _rel(torch.cat(got, 1), full) < 1e-3
