"""GPU checks of the model: bf16 CUDA forward/backward against the fp32 CPU model, SDPA GQA path."""

import pytest
import torch

import megacore
from megacore.layers.attention import attention_reference, attention_sdpa
from megacore.models.gpt import GPTModel

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_cuda_matches_fp32_cpu():
    cfg = megacore.TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                                     vocab_size=1000, seq_length=128)
    ref = GPTModel(cfg, seed=3)
    gpu = GPTModel(cfg, seed=3).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 128))
    labels = torch.roll(ids, -1, 1)
    loss_ref = ref(ids, labels=labels)
    loss_ref.backward()
    loss_gpu = gpu(ids.cuda(), labels=labels.cuda())
    loss_gpu.backward()
    assert abs(loss_gpu.item() - loss_ref.item()) < 2e-2
    for (n, p_ref), (_, p_gpu) in zip(ref.named_parameters(), gpu.named_parameters()):
        assert _rel(p_gpu.grad.cpu(), p_ref.grad) < 5e-2, n


@pytest.mark.parametrize("kv", [1, 4, 16])
def test_sdpa_gqa_matches_reference_on_cuda(kv):
    q = torch.randn(2, 512, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 512, kv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 512, kv, 128, device="cuda", dtype=torch.bfloat16)
    out = attention_sdpa(q, k, v, None, 128 ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), None, 128 ** -0.5)
    assert _rel(out, ref) < 1e-2
