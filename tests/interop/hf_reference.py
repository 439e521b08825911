"""Shared helpers for the Hugging Face interop tests: tiny HF models with random weights (no
download), the reference loss/gradient computation, and reading exported safetensors directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 100  # not a multiple of 128: exercises vocab padding
BATCH, SEQ = 2, 16

_ROPE_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

_DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                 topk_group=2, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=128, num_nextn_predict_layers=0,
                 routed_scaling_factor=2.5, norm_topk_prob=True)
_DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                  "mscale": 0.8, "mscale_all_dim": 0.9, "beta_fast": 32.0, "beta_slow": 1.0}

CASES: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaConfig", dict(_ROPE_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_bias_tied": ("LlamaConfig", dict(_ROPE_COMMON, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True, head_dim=32)),
    "mistral_sliding": ("MistralConfig", dict(_ROPE_COMMON, sliding_window=5)),
    "qwen2_bias": ("Qwen2Config", dict(_ROPE_COMMON, use_sliding_window=False, sliding_window=4)),
    "qwen2_sliding": ("Qwen2Config", dict(_ROPE_COMMON, use_sliding_window=True, sliding_window=6,
                                          max_window_layers=0)),
    "mixtral_moe": ("MixtralConfig", dict(_ROPE_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=None, rms_norm_eps=1e-6)),
    # Qwen2-MoE: q/k/v bias, softmax router, gated shared expert, every layer sparse.
    "qwen2_moe_shared": ("Qwen2MoeConfig", dict(_ROPE_COMMON, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=48, shared_expert_intermediate_size=80)),
    # Every 2nd layer sparse (layers 1, 3: moe_first_k_dense=1, moe_layer_freq=2), renormalized top-k, tied.
    "qwen2_moe_sparse_step": ("Qwen2MoeConfig", dict(_ROPE_COMMON, num_hidden_layers=4, num_experts=6,
                                                     num_experts_per_tok=2, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=40, decoder_sparse_step=2,
                                                     norm_topk_prob=True, tie_word_embeddings=True)),
    # Qwen3-MoE: per-head q/k norm, head_dim != hidden/heads, first layer dense (mlp_only_layers).
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ROPE_COMMON, num_hidden_layers=3, head_dim=32, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                                         mlp_only_layers=[0])),
    # OLMoE: every layer sparse, q/k RMSNorm over the whole projections, raw top-k weights. (No pad token:
    # transformers' embedding would freeze its row's gradient, which megacore trains.)
    "olmoe": ("OlmoeConfig", dict(_ROPE_COMMON, intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                                  norm_topk_prob=False, pad_token_id=None, eos_token_id=2)),
    # DeepSeek-V3: multi-latent attention with the query bottleneck, interleaved-rope checkpoint, first layer
    # dense, 8 sigmoid-routed experts in 4 groups (2 eligible), 2 shared experts, a nonzero score-correction
    # bias (randomize_), routed weights renormalized and scaled.
    "deepseek_v3": ("DeepseekV3Config", dict(_DEEPSEEK, q_lora_rank=24)),
    # ... without the query bottleneck (q_proj), under YaRN with DeepSeek's mscale / mscale_all_dim, and
    # with the half-rotation rope layout (rope_interleave=false), raw top-k weights, no group limit.
    "deepseek_v3_yarn": ("DeepseekV3Config", dict(_DEEPSEEK, q_lora_rank=None, rope_interleave=False,
                                                  norm_topk_prob=False, n_group=1, topk_group=1,
                                                  n_shared_experts=1, routed_scaling_factor=1.5,
                                                  rope_parameters=_DEEPSEEK_YARN)),
    "gpt2_tied": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                     activation_function="gelu_new", bos_token_id=0, eos_token_id=0)),
    # Hybrid: Mamba-2, attention (no rotary), Mamba-2, squared-ReLU MLP; SEQ=16 spans two scan chunks.
    "nemotron_h_hybrid": ("NemotronHConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8,
        n_groups=2, conv_kernel=4, chunk_size=8, time_step_min=0.01, tie_word_embeddings=False,
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"])),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace HF's init (norm weights 1, biases 0, std 0.02) by O(0.1) noise everywhere, so that
    a wrong bias, norm or layout mapping changes the logits visibly (DeepSeek-V3's router bias, a
    buffer, too)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm = p.dim() == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
        p.copy_(1.0 + 0.1 * noise if is_norm else 0.1 * noise)
    for name, b in model.named_buffers():  # DeepSeek-V3's router bias: large enough to change choices
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model


def build_hf(case: str, seed: int = 0, **extra):
    """A randomly initialized tiny HF causal LM for ``case`` (eager attention, fp32, eval mode)."""
    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(**{**kwargs, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize_(model, seed).eval()


def sample_ids(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_loss_and_embedding_grad(model, ids: torch.Tensor):
    """HF's own loss (it shifts the labels internally) and the grad of its input embedding table."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), model.get_input_embeddings().weight.grad.detach().clone()


def megacore_loss_and_embedding_grad(model, ids: torch.Tensor):
    """Our loss with pre-shifted labels (last position unlabelled) and the padded table's grad."""
    model.zero_grad(set_to_none=True)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), model.embedding.word_embeddings.weight.grad.detach().clone()


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every *.safetensors file of ``path`` (independent of megacore's reader)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out), f"tensor stored twice in {path}"
        out.update(part)
    return out


def assert_cli_convert_round_trip(case: str, tmp_path: Path, seed: int = 8) -> None:
    """``megacore convert`` HF -> megacore checkpoint -> HF gives back every tensor and config.json key."""
    import json

    from megacore.cli import main as cli_main

    build_hf(case, seed=seed).save_pretrained(tmp_path / "hf")
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert cli_main(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(ckpt)]) == 0
    assert cli_main(["convert", "--from", "megacore", "--input", str(ckpt), "--output", str(back)]) == 0
    original, exported = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(back)
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert torch.equal(exported[name], t), name
    assert json.loads((back / "config.json").read_text()) == json.loads((tmp_path / "hf" / "config.json").read_text())


def assert_config_round_trip(case: str, tmp_path: Path, seed: int = 3) -> None:
    """HF -> megacore -> HF writes back config.json key for key."""
    import json

    from megacore.interop import hf

    build_hf(case, seed=seed).save_pretrained(tmp_path / "hf")
    hf.save_pretrained(hf.load_pretrained(tmp_path / "hf"), tmp_path / "out")
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == original


def build_sharp_hf(case: str, seed: int, factor: float = 3.0):
    """``build_hf`` with every matrix scaled by ``factor``: sharper logits than ``randomize_``'s, so
    that greedy decoding is not degenerate (generation-parity tests)."""
    model = build_hf(case, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)
    return model
