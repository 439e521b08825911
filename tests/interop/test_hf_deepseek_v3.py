"""DeepSeek-V3 beyond the shared parity test (tests/interop/test_hf_parity.py, cases ``deepseek_v3`` and
``deepseek_v3_yarn``: logits, loss and embedding gradient against transformers, bit-exact export): the
score-correction bias really steers routing, config.json round-trips key for key, YaRN's mscale terms
map to the same softmax scale and cos/sin factor both ways, greedy decoding (plain and absorbed MLA
cache) reproduces transformers' generate, the expert bias stays fp32 (in a bf16 load and while
training moves it), and what the family cannot hold is refused. The MTP modules:
tests/interop/test_hf_deepseek_v3_mtp.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.interop.hf_reference import CASES, build_sharp_hf, assert_cli_convert_round_trip, assert_config_round_trip, VOCAB, build_hf, sample_ids, transformers

from megacore.config import ConfigError, TransformerConfig
from megacore.inference.sampling import generate
from megacore.interop import hf
from megacore.layers.attention import default_softmax_scale
from megacore.layers.mla import set_absorbed_decode
from megacore.layers.rotary import RotaryEmbedding
from megacore.models import GPTModel

DS_CASES = ["deepseek_v3", "deepseek_v3_yarn"]
_BASE = {**CASES["deepseek_v3"][1], "model_type": "deepseek_v3", "q_lora_rank": 24}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("case", DS_CASES)
def test_config_json_round_trips_key_for_key(tmp_path, case):
    assert_config_round_trip(case, tmp_path)


@pytest.mark.parametrize("case", DS_CASES)
def test_config_maps_both_ways_without_the_loaded_dict(case):
    """config.json -> TransformerConfig -> config.json (written from scratch) -> the same TransformerConfig,
    and transformers' DeepseekV3Config reads the written dict as the same model."""
    cls, kwargs = CASES[case]
    original = getattr(transformers, cls)(**kwargs).to_dict()
    ours = hf.config_from_hf(original)
    written = hf.config_to_hf(ours, "deepseek_v3")
    assert hf.config_from_hf(written) == ours
    back = transformers.DeepseekV3Config(**{k: v for k, v in written.items() if k not in ("model_type", "architectures")})
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
                "topk_group", "n_shared_experts", "n_routed_experts", "first_k_dense_replace", "routed_scaling_factor",
                "norm_topk_prob", "moe_intermediate_size", "intermediate_size", "num_key_value_heads"):
        assert getattr(back, key) == original[key], key
    c = ours
    assert c.moe_shared_expert_hidden_size == original["n_shared_experts"] * original["moe_intermediate_size"]
    assert not c.moe_shared_expert_gate and c.moe_aux_loss_coeff == 0.0 and c.mtp_num_layers == 0
    if original["n_group"] == 1:
        assert c.moe_router_num_groups is None and written["n_group"] == written["topk_group"] == 1
    else:
        assert (c.moe_router_num_groups, c.moe_router_group_topk) == (4, 2)


def test_the_router_bias_steers_routing(tmp_path):
    """With the checkpoint's bias zeroed, megacore's logits move away from HF's: the bias is loaded and
    used for the choice (and only there: the bias-free model matches HF with its bias zeroed too)."""
    ref = build_hf("deepseek_v3", seed=1)
    ref.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path)
    ids = sample_ids(seed=2)
    want = ref(input_ids=ids).logits.detach()
    assert (_logits(ours, ids) - want).abs().max() <= 1e-4
    for layer in ours.decoder.layers.values():
        if layer.mlp.__class__.__name__ == "MoELayer":
            layer.mlp.router.expert_bias.zero_()
    assert (_logits(ours, ids) - want).abs().max() > 1e-2
    with torch.no_grad():
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        assert (_logits(ours, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------- YaRN
def _hf_terms(rope: dict) -> tuple[float, float]:
    """(cos/sin factor, softmax scale) of transformers' DeepSeek-V3 for ``rope`` on the tiny shape."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    cfg = transformers.DeepseekV3Config(**{**CASES["deepseek_v3"][1], "rope_parameters": rope})
    return DeepseekV3RotaryEmbedding(cfg).attention_scaling, DeepseekV3Attention(cfg, 0).scaling


def _our_terms(c: TransformerConfig) -> tuple[float, float]:
    return RotaryEmbedding(c).attention_scaling, default_softmax_scale(c)


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
         "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize("extra,mscales", [
    (dict(mscale=0.8, mscale_all_dim=0.9), (0.8, 0.9)),      # DeepSeek's own configs: both set, map as they are
    (dict(mscale=1.0, mscale_all_dim=1.0), (1.0, 1.0)),
    (dict(mscale=0.7), None),                                # transformers ignores a lone mscale
    (dict(mscale_all_dim=0.9), None),                        # softmax term without the matching cos/sin term
    (dict(mscale=0.8, mscale_all_dim=0.9, attention_factor=1.3), None),
    (dict(), (1.0, 0.0)),
    (dict(mscale=0.0, mscale_all_dim=0.0), (1.0, 0.0)),
])
def test_yarn_mscale_terms_match_transformers_both_ways(extra, mscales):
    rope = {**_YARN, **extra}
    ours = hf.config_from_hf({**_BASE, "rope_parameters": rope})
    want = _hf_terms(rope)
    got = _our_terms(ours)
    assert got == pytest.approx(want, rel=1e-12)
    if mscales is not None:
        assert (ours.rotary_mscale, ours.rotary_mscale_all_dim) == mscales
    # written from scratch, transformers computes the same terms again, and it reads back the same fields
    written = hf.config_to_hf(ours, "deepseek_v3")["rope_parameters"]
    assert _hf_terms(written) == pytest.approx(want, rel=1e-12)
    again = hf.config_from_hf({**_BASE, "rope_parameters": written})
    assert (again.rotary_mscale, again.rotary_mscale_all_dim) == (ours.rotary_mscale, ours.rotary_mscale_all_dim)


@pytest.mark.parametrize("mscale,all_dim", [(0.7, 0.0), (1.0, 0.0), (1.0, 0.8), (0.7, 0.7), (1.3, 0.5)])
def test_megacore_yarn_settings_export_to_the_same_terms(mscale, all_dim):
    """megacore's own fields, including rotary_mscale != 1 with rotary_mscale_all_dim = 0 (a cos/sin factor
    of yarn_mscale(f, mscale), which transformers would not infer from mscale alone: attention_factor)."""
    c = hf.config_from_hf({**_BASE, "rope_parameters": _YARN})
    c.rotary_mscale, c.rotary_mscale_all_dim = mscale, all_dim
    written = hf.config_to_hf(c, "deepseek_v3")["rope_parameters"]
    assert ("attention_factor" in written) == (all_dim == 0 and mscale != 1)
    assert _hf_terms(written) == pytest.approx(_our_terms(c), rel=1e-12)
    back = hf.config_from_hf({**_BASE, "rope_parameters": written})
    assert (back.rotary_mscale, back.rotary_mscale_all_dim) == (mscale, all_dim)


def test_yarn_scaling_from_the_4x_rope_scaling_spelling():
    """DeepSeek's hub configs carry ``rope_theta`` + ``rope_scaling`` {type: yarn, ...}."""
    cfg = hf.config_from_hf({**_BASE, "rope_theta": 10000.0, "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}, "max_position_embeddings": 163840})
    assert (cfg.rotary_scaling, cfg.rotary_scaling_factor, cfg.rotary_original_max_positions) == ("yarn", 40.0, 4096)
    assert (cfg.rotary_mscale, cfg.rotary_mscale_all_dim) == (1.0, 1.0)
    m = 0.1 * math.log(40) + 1.0
    assert default_softmax_scale(cfg) == pytest.approx(m * m / math.sqrt(16), rel=1e-12)


# --------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("absorb", [False, True], ids=["plain", "absorbed"])
@pytest.mark.parametrize("case", DS_CASES)
def test_greedy_generation_matches_transformers(tmp_path, case, absorb):
    """The KV-cache decode path (MLA latents cached; plain or absorbed up-projections) through dense,
    MoE and shared-expert layers decodes HF's tokens."""
    ref = build_sharp_hf(case, seed=5)
    ref.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path)
    if absorb:
        set_absorbed_decode(ours)
    prompt = [5, 17, 42, 8, 99, 3]
    ref.generation_config.eos_token_id = None
    expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert len(set(expected)) > 3, "degenerate reference"
    assert generate(ours, torch.tensor(prompt), 10)[len(prompt):].tolist() == expected


# --------------------------------------------------------------------------------------- the bias
def test_bf16_load_keeps_the_bias_fp32_and_exact(tmp_path):
    ref = build_hf("deepseek_v3", seed=7)
    ref.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path, dtype=torch.bfloat16)
    router = ours.decoder.layers["2"].mlp.router
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    assert torch.equal(router.expert_bias, ref.model.layers[2].mlp.gate.e_score_correction_bias)
    assert torch.equal(hf.hf_state_dict(ours)["model.layers.2.mlp.gate.e_score_correction_bias"],
                       ref.model.layers[2].mlp.gate.e_score_correction_bias)


def test_training_the_imported_model_moves_the_fp32_bias(tmp_path):
    """Imported with moe_router_bias_update_rate > 0, the loaded bias is the start of aux-loss-free
    balancing: each optimizer step moves it by ±rate (or 0), in fp32, also for a bf16 model; the
    weights train as usual and the model still exports."""
    from megacore.training.moe import end_moe_step, moe_layers

    rate = 1e-3
    ref = build_hf("deepseek_v3", seed=8)
    ref.save_pretrained(tmp_path / "hf")
    loaded = [layer.mlp.gate.e_score_correction_bias.clone() for layer in ref.model.layers[1:]]
    for dtype in (torch.float32, torch.bfloat16):
        model = hf.load_pretrained(tmp_path / "hf", dtype=dtype, moe_router_bias_update_rate=rate).train()
        layers = moe_layers([model])
        assert len(layers) == 2
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(9))
        for _ in range(3):
            opt.zero_grad()
            model(ids, labels=ids).backward()
            opt.step()
            end_moe_step(layers, model.config)
        for layer, start in zip(layers, loaded):
            bias = layer.router.expert_bias
            assert bias.dtype == torch.float32
            steps = (bias - start) / rate
            assert steps.abs().max() > 0.5, "the bias did not move"
            assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 3 + 1e-3
        out = hf.hf_state_dict(model)
        assert torch.equal(out["model.layers.1.mlp.gate.e_score_correction_bias"], layers[0].router.expert_bias)


def test_a_kept_bias_does_not_move_in_training(tmp_path):
    from megacore.training.moe import end_moe_step, moe_layers

    ref = build_hf("deepseek_v3", seed=8)
    ref.save_pretrained(tmp_path)
    model = hf.load_pretrained(tmp_path).train()
    assert model.config.moe_router_bias_update_rate == 0 and model.config.moe_router_expert_bias
    layers = moe_layers([model])
    before = [layer.router.expert_bias.clone() for layer in layers]
    model(sample_ids(seed=1), labels=sample_ids(seed=1)).backward()
    end_moe_step(layers, model.config)
    for layer, b in zip(layers, before):
        assert torch.equal(layer.router.expert_bias, b)


def test_cli_convert_round_trip(tmp_path):
    """``megacore convert`` HF -> megacore checkpoint -> HF: every tensor (the fp32 router bias, a buffer,
    included) and config.json key back as they were."""
    assert_cli_convert_round_trip("deepseek_v3", tmp_path)


# --------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra,match", [
    (dict(num_key_value_heads=2), "num_key_value_heads=2 differs"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(n_group=None), "n_group=None"),
    (dict(first_k_dense_replace=3), "first_k_dense_replace=3"),
    (dict(n_shared_experts=0), "n_shared_experts=0"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "mscale_all_dim": 1.0}),
     "mscale_all_dim"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}), "dequantize it"),
])
def test_import_refusals(extra, match):
    with pytest.raises(ConfigError, match=match):
        hf.config_from_hf({**_BASE, "num_hidden_layers": 3, **extra})


def test_q_lora_rank_null_means_a_full_rank_query_and_absent_means_the_default():
    assert hf.config_from_hf({**_BASE, "q_lora_rank": None}).q_lora_rank is None
    base = dict(_BASE)
    del base["q_lora_rank"]
    assert hf.config_from_hf(base).q_lora_rank == 1536


_SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16, num_experts=4,
              multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
              v_head_dim=6, moe_ffn_hidden_size=16, moe_shared_expert_hidden_size=32, moe_router_score="sigmoid",
              moe_router_expert_bias=True, moe_first_k_dense=1, norm_epsilon=1e-6)


@pytest.mark.parametrize("family,fields,match", [
    ("deepseek_v3", dict(moe_router_expert_bias=False), "moe_router_expert_bias"),
    ("deepseek_v3", dict(moe_shared_expert_gate=True), "moe_shared_expert_gate"),
    ("deepseek_v3", dict(moe_shared_expert_hidden_size=24), "moe_shared_expert_hidden_size"),
    ("deepseek_v3", dict(moe_shared_expert_hidden_size=None), "moe_shared_expert_hidden_size"),
    ("deepseek_v3", dict(moe_layer_freq=2, num_layers=4), "moe_layer_freq"),
    ("deepseek_v3", dict(moe_router_score="softmax"), "moe_router_score"),
    ("deepseek_v3", dict(norm_epsilon=1e-5), "norm_epsilon"),
    ("deepseek_v3", dict(num_experts=None), "num_experts"),
    ("deepseek_v3", dict(attention_softmax_scale=0.3), "attention_softmax_scale"),
    ("deepseek_v3", dict(moe_router_num_groups=4, moe_router_group_topk=2), "moe_router_num_groups"),
    ("deepseek_v3", dict(multi_latent_attention=False, q_lora_rank=None), "multi_latent_attention"),
    ("llama", dict(num_experts=None), "multi_latent_attention"),
    ("qwen3_moe", dict(qk_norm=False), "multi_latent_attention"),
    ("mixtral", dict(moe_router_score="softmax", moe_first_k_dense=0, moe_shared_expert_hidden_size=None,
                     moe_ffn_hidden_size=None, multi_latent_attention=False), "moe_router_expert_bias"),
])
def test_export_refuses_what_the_family_cannot_hold(tmp_path, family, fields, match):
    model = GPTModel(TransformerConfig(**{**_SMALL, **fields}).validate())
    with pytest.raises(ConfigError, match=f"cannot export to Hugging Face {family}: model.{match}"):
        hf.save_pretrained(model, tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()


def test_a_megacore_built_model_exports_and_transformers_runs_it(tmp_path):
    """Built in megacore (half-rotation rope, own init, the family inferred from MLA): the export is
    interleaved (rope_interleave true) and transformers computes the same logits."""
    c = TransformerConfig(**{**_SMALL, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
                             "moe_routed_scaling_factor": 2.5, "vocab_padding_multiple": 1}).validate()
    model = GPTModel(c, seed=3).eval()
    with torch.no_grad():
        model.decoder.layers["1"].mlp.router.expert_bias.copy_(0.3 * torch.randn(4, generator=torch.Generator().manual_seed(1)))
    assert hf.infer_family(c) == "deepseek_v3"
    hf.save_pretrained(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_interleave"] is True and written["architectures"] == ["DeepseekV3ForCausalLM"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-4
