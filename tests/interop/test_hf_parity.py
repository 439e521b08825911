"""Parity with Hugging Face transformers for every supported family (CPU, fp32, random weights).

For each case: HF saves a tiny random model -> megacore loads it -> logits, loss and the gradient
of the embedding table match HF -> megacore exports it -> every exported tensor equals HF's
original bit for bit, and transformers loads the export with nothing missing.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.hf_reference import (
    CASES,
    VOCAB,
    build_hf,
    hf_loss_and_embedding_grad,
    megacore_loss_and_embedding_grad,
    read_safetensors_dir,
    sample_ids,
    transformers,
)

from megacore.interop import hf

# (case, HF-side max_shard_size, megacore-side max_shard_size): some cases go through shards.
PLAN = [
    ("llama_gqa", "20KB", "30KB"),
    ("llama_bias_tied", None, None),
    ("mistral_sliding", None, "40KB"),
    ("qwen2_bias", "30KB", None),
    ("qwen2_sliding", None, None),
    ("mixtral_moe", "60KB", None),
    ("qwen2_moe_shared", "60KB", None),
    ("qwen2_moe_sparse_step", None, "40KB"),
    ("qwen3_moe", None, None),
    ("olmoe", "50KB", None),
    ("deepseek_v3", "60KB", None),
    ("deepseek_v3_yarn", None, "50KB"),
    ("gpt2_tied", "25KB", "25KB"),
    ("nemotron_h_hybrid", "30KB", None),
]
EXPECTED_FAMILY = {"llama_gqa": "llama", "llama_bias_tied": "llama", "mistral_sliding": "mistral",
                   "qwen2_bias": "qwen2", "qwen2_sliding": "qwen2", "mixtral_moe": "mixtral",
                   "gpt2_tied": "gpt2", "nemotron_h_hybrid": "nemotron_h", "qwen2_moe_shared": "qwen2_moe",
                   "qwen2_moe_sparse_step": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe", "deepseek_v3": "deepseek_v3",
                   "deepseek_v3_yarn": "deepseek_v3"}


def _save_hf(model, path, shard):
    if shard is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=shard)
        assert (path / "model.safetensors.index.json").exists(), "HF did not shard; lower max_shard_size"


@pytest.mark.parametrize("case,hf_shard,our_shard", PLAN, ids=[p[0] for p in PLAN])
def test_roundtrip_parity(tmp_path, case, hf_shard, our_shard):
    ref = build_hf(case, seed=1)
    src, dst = tmp_path / "hf", tmp_path / "export"
    _save_hf(ref, src, hf_shard)

    ours = hf.load_pretrained(src)
    assert ours.hf_family == EXPECTED_FAMILY[case]
    assert ours.config.vocab_size == VOCAB and ours.config.padded_vocab_size == 128
    table = ours.embedding.word_embeddings.weight
    assert torch.count_nonzero(table[VOCAB:]) == 0, "vocab padding rows must be zero"
    if case == "mistral_sliding":
        assert ours.config.sliding_window == 5
    if case == "qwen2_bias":
        assert ours.config.sliding_window is None and ours.config.add_qkv_bias
    if case == "qwen2_sliding":
        assert ours.config.sliding_window == 6
    if case == "mixtral_moe":
        assert (ours.config.num_experts, ours.config.moe_top_k) == (4, 2)
    if case.startswith("qwen2_moe"):
        assert ours.config.moe_shared_expert_gate and ours.config.add_qkv_bias
    if case == "qwen2_moe_sparse_step":
        assert (ours.config.moe_first_k_dense, ours.config.moe_layer_freq) == (1, 2)
    if case.startswith("deepseek_v3"):
        c = ours.config
        assert c.multi_latent_attention and c.moe_router_score == "sigmoid" and c.moe_router_expert_bias
        assert (c.moe_first_k_dense, c.moe_layer_freq, c.num_experts) == (1, 1, 8)
        bias = ours.decoder.layers["1"].mlp.router.expert_bias
        assert bias.dtype == torch.float32 and torch.equal(bias, ref.model.layers[1].mlp.gate.e_score_correction_bias)
    if case == "qwen3_moe":
        assert ours.config.qk_norm and ours.config.kv_channels == 32 and ours.config.moe_first_k_dense == 1

    # Forward parity.
    ids = sample_ids(seed=2)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        our_logits = ours(ids)
    assert our_logits.shape == ref_logits.shape
    assert (our_logits - ref_logits).abs().max().item() <= 1e-4

    # Loss and gradient parity (HF shifts labels inside; ours are pre-shifted).
    ref_loss, ref_grad = hf_loss_and_embedding_grad(ref, ids)
    our_loss, our_grad = megacore_loss_and_embedding_grad(ours, ids)
    torch.testing.assert_close(our_loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad[:VOCAB], ref_grad, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(our_grad[VOCAB:]) == 0, "padding rows must get no gradient"

    # Export: every tensor bit-identical to what HF wrote, under the same names, loadable by HF.
    # (Files, not state_dict: Mixtral's and Qwen-MoE's in-memory experts are fused, their files are not.)
    hf.save_pretrained(ours, dst, max_shard_size=our_shard or "5GB")
    assert (dst / "model.safetensors.index.json").exists() == (our_shard is not None)
    exported, hf_written = read_safetensors_dir(dst), read_safetensors_dir(src)
    assert set(exported) == set(hf_written)
    original = ref.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, hf_written[name]), f"exported {name} differs from the HF original"

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        dst, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded) is type(ref)
    reloaded_sd = reloaded.state_dict()
    assert set(reloaded_sd) == set(original)
    for name, tensor in original.items():
        assert torch.equal(reloaded_sd[name], tensor), f"{name} changed through megacore"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, ref_logits, atol=0, rtol=0)

    # The exported config keeps what megacore does not model (token ids) from the original.
    exported_cfg = json.loads((dst / "config.json").read_text())
    original_cfg = json.loads((src / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "model_type", "vocab_size"):
        assert exported_cfg.get(key) == original_cfg.get(key), key


def test_cases_cover_every_family():
    assert {EXPECTED_FAMILY[c] for c in CASES} == set(hf.FAMILIES)
