"""Multi-latent attention on the GPU: a bf16 MLA model (SDPA's GPU kernels, q/k head dim != v head
dim) against the same weights in fp32 on the CPU, and cached plain/absorbed decoding against the
full forward."""

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.models import GPTModel

pytestmark = pytest.mark.gpu


def _config(**kw):
    return TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, vocab_size=512,
                             seq_length=128, multi_latent_attention=True, q_lora_rank=96, kv_lora_rank=64,
                             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, **kw).validate()


def test_mla_model_on_gpu_matches_cpu_fp32():
    cpu = GPTModel(_config(), seed=3)
    gpu = GPTModel(_config(), seed=3).to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    want = cpu(ids, labels=ids)
    got = gpu(ids.cuda(), labels=ids.cuda())
    assert abs(got.float().item() - want.item()) < 2e-2 * want.item()
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters() if p.requires_grad)


@pytest.mark.parametrize("absorb", [False, True])
def test_mla_cached_decode_on_gpu_matches_full_forward(absorb):
    from megacore.inference.sampling import generate
    from megacore.layers.mla import set_absorbed_decode

    model = GPTModel(_config(), seed=4).to(device="cuda", dtype=torch.float32).eval()
    set_absorbed_decode(model, absorb)
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1)).cuda()
    cached = generate(model, prompt, 8, use_cache=True)
    uncached = generate(model, prompt, 8, use_cache=False)  # the full forward at every step
    assert torch.equal(cached, uncached)
