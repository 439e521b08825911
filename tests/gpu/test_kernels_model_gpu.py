"""GPU: the model's Triton kernels (the default on CUDA) against the plain-torch path, eager and compiled.

bf16 model of moderate size; loss within 1e-2 and every gradient within 5e-2 (relative Frobenius)
of the same model on the torch path; per-layer ``torch.compile`` (inductor, fullgraph) with the
kernels as custom ops runs, matches eager, and has no graph break.
"""

import pytest
import torch

import megacore
from megacore.kernels import kernel_backend
from megacore.models.gpt import GPTModel
from megacore.training.compile import compile_model

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _model(seed=0, **kw):
    cfg = megacore.TransformerConfig(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                                     ffn_hidden_size=1408, vocab_size=5000, seq_length=256, **kw)
    return cfg, GPTModel(cfg, seed=seed).cuda().to(torch.bfloat16)


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, **kw)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(), dict(activation="geglu", qk_norm=True, tie_embeddings=True)])
def test_kernels_match_torch_path_bf16(kw):
    cfg, model = _model(**kw)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    labels = torch.roll(ids, -1, 1)
    mask = (torch.rand(ids.shape, device="cuda") > 0.2).float()
    for extra in (dict(), dict(loss_mask=mask, reduction="sum")):
        with kernel_backend("torch"):
            ref_loss, ref_grads = _run(model, ids, labels, **extra)
        fast_loss, fast_grads = _run(model, ids, labels, **extra)  # auto: Triton on CUDA
        assert abs(fast_loss - ref_loss) / ref_loss.abs() < 1e-2, (fast_loss, ref_loss)
        for n, g in ref_grads.items():
            assert _rel(fast_grads[n], g) < 5e-2, n


def test_compiled_model_with_kernels_matches_eager():
    cfg, model = _model(seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    labels = torch.roll(ids, -1, 1)
    eager_loss, eager_grads = _run(model, ids, labels)
    torch._dynamo.reset()
    compile_model(model, fullgraph=True)  # fullgraph: a graph break raises
    for _ in range(2):
        loss, grads = _run(model, ids, labels)
    assert abs(loss - eager_loss) / eager_loss.abs() < 1e-2
    for n, g in eager_grads.items():
        assert _rel(grads[n], g) < 5e-2, n
    torch._dynamo.reset()
