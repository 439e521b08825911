"""Export of models built in megacore (no HF origin): transformers reproduces our logits, and the
export directory is written atomically."""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.hf_reference import VOCAB, sample_ids, transformers

from megacore.config import TransformerConfig
from megacore.interop import hf
from megacore.models import GPTModel

_BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
             seq_length=32, init_std=0.1)
SCRATCH = {
    "llama": dict(_BASE, num_query_groups=2, tie_embeddings=True),
    "mistral": dict(_BASE, num_query_groups=1, sliding_window=5),
    "qwen2": dict(_BASE, num_query_groups=2, add_qkv_bias=True, sliding_window=7),
    "qwen2_moe": dict(_BASE, num_query_groups=2, add_qkv_bias=True, num_experts=4, moe_top_k=2,
                      moe_ffn_hidden_size=32, moe_shared_expert_hidden_size=48, moe_shared_expert_gate=True,
                      moe_router_norm_topk=False, moe_first_k_dense=1),
    "qwen3_moe": dict(_BASE, num_layers=3, num_query_groups=2, kv_channels=32, qk_norm=True, num_experts=4,
                      moe_top_k=2, moe_ffn_hidden_size=32, moe_layer_freq=2, sliding_window=6),
    "gpt2": dict(_BASE, position_embedding="learned", normalization="LayerNorm", activation="gelu_tanh",
                 add_qkv_bias=True, add_bias_linear=True, tie_embeddings=True),
}


@torch.no_grad()
def _perturb_(model):
    """Biases and norm weights start at 0/1; move them so a wrong mapping would show."""
    gen = torch.Generator().manual_seed(11)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", list(SCRATCH))
def test_scratch_export_parity(tmp_path, family):
    ours = GPTModel(TransformerConfig(**SCRATCH[family]), seed=10).eval()
    _perturb_(ours)
    assert hf.infer_family(ours.config) == family
    hf.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = sample_ids(seed=12)
    with torch.no_grad():
        assert (theirs.eval()(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4
    # megacore -> HF -> megacore keeps every weight (vocab padding rows come back as zeros).
    back = hf.load_pretrained(tmp_path / "out")
    assert back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        if "word_embeddings" in name or "output_layer" in name:
            a, b = a[:VOCAB], b[:VOCAB]
        assert torch.equal(a, b), name


def test_atomic_save_keeps_other_files_and_drops_stale_shards(tmp_path, monkeypatch):
    model = GPTModel(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB))
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    (out / "model.safetensors.index.json").write_text("stale")
    hf.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "temporary directories left behind"

    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a failed save changed the directory"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
