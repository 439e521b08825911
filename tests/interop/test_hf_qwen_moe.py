"""Qwen2-MoE, Qwen3-MoE and OLMoE beyond the shared parity test (tests/interop/test_hf_parity.py): config.json
round-trips key for key, the sparse-layer layout maps both ways or is refused by name, greedy decoding
reproduces transformers' generate, and what the families cannot hold is refused."""

from __future__ import annotations


import pytest
import torch

from tests.interop.hf_reference import CASES, build_sharp_hf, assert_cli_convert_round_trip, assert_config_round_trip, build_hf, sample_ids, transformers

from megacore.config import ConfigError, TransformerConfig
from megacore.inference.sampling import generate
from megacore.interop import hf
from megacore.interop.families.qwen2_moe import hf_sparse_layers, moe_layers
from megacore.models import GPTModel

QWEN_CASES = [c for c in CASES if c.startswith(("qwen2_moe", "qwen3_moe", "olmoe"))]
_HF_BASE = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)


@pytest.mark.parametrize("case", QWEN_CASES)
def test_config_json_round_trips_key_for_key(tmp_path, case):
    assert_config_round_trip(case, tmp_path)


@pytest.mark.parametrize("family,num_layers,step,mlp_only,want", [
    ("qwen2_moe", 4, 1, [], (0, 1)),
    ("qwen2_moe", 4, 2, [], (1, 2)),
    ("qwen2_moe", 6, 3, [], (2, 3)),
    ("qwen2_moe", 4, 1, [0], (1, 1)),
    ("qwen3_moe", 4, 1, [0, 1], (2, 1)),
    ("qwen3_moe", 5, 2, [1], (3, 2)),      # sparse {3}: one MoE layer
    ("qwen3_moe", 3, 1, [0, 2], (1, 2)),   # sparse {1}
])
def test_sparse_layers_map_to_first_k_dense_and_layer_freq(family, num_layers, step, mlp_only, want):
    cfg = hf.config_from_hf({**_HF_BASE, "model_type": family, "num_hidden_layers": num_layers,
                             "decoder_sparse_step": step, "mlp_only_layers": mlp_only})
    assert (cfg.moe_first_k_dense, cfg.moe_layer_freq) == want
    sparse = hf_sparse_layers(num_layers, step, mlp_only)
    assert [i for i in range(num_layers) if cfg.is_moe_layer(i)] == sparse


@pytest.mark.parametrize("step,mlp_only,sparse", [
    (1, [1], [0, 2, 3]),       # a dense layer between sparse ones
    (1, [3], [0, 1, 2]),       # a dense layer after the sparse ones
    (1, [0, 3], [1, 2]),       # dense layers on both sides
    (1, [0, 1, 2, 3], []),     # no sparse layer at all
    (5, [], []),
])
def test_unmappable_sparse_layers_are_refused_by_name(step, mlp_only, sparse):
    hf_cfg = {**_HF_BASE, "model_type": "qwen2_moe", "num_hidden_layers": 4, "decoder_sparse_step": step,
              "mlp_only_layers": mlp_only}
    with pytest.raises(ConfigError, match=r"decoder_sparse_step=.*mlp_only_layers=.*cannot represent") as err:
        hf.config_from_hf(hf_cfg)
    assert str(sparse) in str(err.value)


def test_unmappable_checkpoint_fails_to_load_naming_the_file(tmp_path):
    build_hf("qwen2_moe_sparse_step", seed=4, decoder_sparse_step=1, mlp_only_layers=[1]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.json.*decoder_sparse_step=1 with mlp_only_layers=\[1\]"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_every_megacore_layout_exports_to_the_same_layers(family):
    """Each (moe_first_k_dense, moe_layer_freq) is written as decoder_sparse_step + mlp_only_layers that
    transformers reads as the same sparse layers, and reads back as the same pair."""
    n = 6
    extra = dict(qk_norm=True) if family == "qwen3_moe" else dict(moe_shared_expert_hidden_size=24,
                                                                   moe_shared_expert_gate=True, add_qkv_bias=True)
    for k in range(n):
        for freq in range(1, n + 1):
            c = TransformerConfig(num_layers=n, hidden_size=32, num_attention_heads=4, vocab_size=100, num_experts=4,
                                  moe_first_k_dense=k, moe_layer_freq=freq, **extra).validate()
            out = hf.config_to_hf(c, family)
            assert hf_sparse_layers(n, out["decoder_sparse_step"], out["mlp_only_layers"]) == moe_layers(n, k, freq)
            back = hf.config_from_hf(out)
            assert [i for i in range(n) if back.is_moe_layer(i)] == moe_layers(n, k, freq)
    c = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=100, num_experts=4,
                          moe_first_k_dense=1, moe_layer_freq=2, **extra).validate()
    assert {k: hf.config_to_hf(c, family)[k] for k in ("decoder_sparse_step", "mlp_only_layers")} == \
        {"decoder_sparse_step": 2, "mlp_only_layers": []}


def test_aux_loss_coefficient_maps_as_mixtral():
    base = {**_HF_BASE, "model_type": "qwen2_moe", "num_hidden_layers": 2, "router_aux_loss_coef": 0.02}
    assert hf.config_from_hf(base).moe_aux_loss_coeff == 0.0   # transformers adds the loss only with router logits
    cfg = hf.config_from_hf({**base, "output_router_logits": True})
    assert cfg.moe_aux_loss_coeff == 0.02
    out = hf.config_to_hf(cfg, "qwen2_moe")
    assert (out["router_aux_loss_coef"], out["output_router_logits"]) == (0.02, True)
    cfg.moe_aux_loss_coeff = 0.0
    assert hf.config_to_hf(cfg, "qwen2_moe")["output_router_logits"] is False


def test_qwen3_expert_count_under_either_key():
    base = {**_HF_BASE, "model_type": "qwen3_moe", "num_hidden_layers": 2, "head_dim": 16}
    del base["num_experts"]
    for key in ("num_experts", "num_local_experts"):
        cfg = hf.config_from_hf({**base, key: 6})
        assert cfg.num_experts == 6 and cfg.qk_norm
        assert hf.config_to_hf(cfg, "qwen3_moe", base={**base, key: 6})[key] == 6
    assert "num_experts" in hf.config_to_hf(cfg, "qwen3_moe")
    assert transformers.Qwen3MoeConfig(**{k: v for k, v in hf.config_to_hf(cfg, "qwen3_moe").items()
                                          if k not in ("model_type", "architectures")}).num_experts == 6


@pytest.mark.parametrize("case", ["qwen2_moe_sparse_step", "qwen3_moe", "olmoe"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    """MoE, dense and shared-expert layers in the KV-cache decode path decode HF's tokens."""
    ref = build_sharp_hf(case, seed=5)
    ref.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path)
    prompt = [5, 17, 42, 8, 99, 3]
    ref.generation_config.eos_token_id = None
    expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert len(set(expected)) > 3, "degenerate reference"
    assert generate(ours, torch.tensor(prompt), 12)[len(prompt):].tolist() == expected


_SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16, num_experts=4)


@pytest.mark.parametrize("family,fields,match", [
    ("qwen2_moe", dict(), "moe_shared_expert_hidden_size"),
    ("qwen2_moe", dict(moe_shared_expert_hidden_size=16), "moe_shared_expert_gate"),
    ("qwen2_moe", dict(moe_shared_expert_hidden_size=16, moe_shared_expert_gate=True, moe_router_num_groups=2,
                       moe_router_group_topk=1), "moe_router_num_groups"),
    ("qwen2_moe", dict(moe_shared_expert_hidden_size=16, moe_shared_expert_gate=True, moe_router_score="sigmoid"),
     "moe_router_score"),
    ("qwen3_moe", dict(), "qk_norm"),
    ("qwen3_moe", dict(qk_norm=True, add_qkv_bias=True), "add_qkv_bias"),
    ("qwen3_moe", dict(qk_norm=True, moe_shared_expert_hidden_size=16), "moe_shared_expert_hidden_size"),
    ("qwen3_moe", dict(qk_norm=True, moe_routed_scaling_factor=2.5), "moe_routed_scaling_factor"),
    ("qwen3_moe", dict(qk_norm=True, qk_norm_scope="projection"), "qk_norm_scope"),
    ("olmoe", dict(), "qk_norm"),
    ("olmoe", dict(qk_norm=True), "qk_norm_scope"),
    ("olmoe", dict(qk_norm=True, qk_norm_scope="projection", moe_layer_freq=2), "moe_layer_freq"),
    ("olmoe", dict(qk_norm=True, qk_norm_scope="projection", moe_shared_expert_hidden_size=16),
     "moe_shared_expert_hidden_size"),
    ("mixtral", dict(moe_first_k_dense=1), "moe_first_k_dense"),
    ("mixtral", dict(moe_layer_freq=2), "moe_layer_freq"),
    ("mixtral", dict(moe_shared_expert_hidden_size=16), "moe_shared_expert_hidden_size"),
])
def test_export_refuses_what_the_family_cannot_hold(tmp_path, family, fields, match):
    model = GPTModel(TransformerConfig(**_SMALL, **fields).validate())
    with pytest.raises(ConfigError, match=f"cannot export to Hugging Face {family}: model.{match}"):
        hf.save_pretrained(model, tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()


def test_import_refusals():
    base = {**_HF_BASE, "num_hidden_layers": 2}
    with pytest.raises(ConfigError, match="attention_bias=true"):
        hf.config_from_hf({**base, "model_type": "qwen3_moe", "attention_bias": True})
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size=0"):
        hf.config_from_hf({**base, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 0})
    with pytest.raises(ConfigError, match="mixes sliding and full"):
        hf.config_from_hf({**base, "model_type": "qwen2_moe", "use_sliding_window": True, "sliding_window": 8,
                           "max_window_layers": 2})   # transformers: layer 0 slides, layer 1 does not
    olmoe = {**base, "model_type": "olmoe", "intermediate_size": 16}
    with pytest.raises(ConfigError, match="attention_bias=true is not supported for olmoe"):
        hf.config_from_hf({**olmoe, "attention_bias": True})
    with pytest.raises(ConfigError, match="clip_qkv=8.0 is not supported for olmoe"):
        hf.config_from_hf({**olmoe, "clip_qkv": 8.0})
    cfg = hf.config_from_hf(olmoe)
    assert (cfg.qk_norm, cfg.qk_norm_scope, cfg.moe_ffn_size, cfg.moe_first_k_dense) == (True, "projection", 16, 0)


def test_infer_family_for_moe_models():
    assert hf.infer_family(TransformerConfig(**_SMALL)) == "mixtral"
    assert hf.infer_family(TransformerConfig(**_SMALL, qk_norm=True)) == "qwen3_moe"
    assert hf.infer_family(TransformerConfig(**_SMALL, qk_norm=True, qk_norm_scope="projection")) == "olmoe"
    assert hf.infer_family(TransformerConfig(**_SMALL, moe_shared_expert_hidden_size=16,
                                             moe_shared_expert_gate=True, add_qkv_bias=True)) == "qwen2_moe"


def test_sliding_window_round_trips_through_transformers(tmp_path):
    """A window on every layer: Qwen2-MoE spells it with layer_types, Qwen3-MoE with use_sliding_window."""
    for case in ("qwen2_moe_shared", "qwen3_moe"):
        extra = dict(use_sliding_window=True, sliding_window=5)
        if case == "qwen2_moe_shared":
            extra["layer_types"] = ["sliding_attention"] * CASES[case][1]["num_hidden_layers"]
        ref = build_hf(case, seed=6, **extra)
        ref.save_pretrained(tmp_path / case)
        ours = hf.load_pretrained(tmp_path / case)
        assert ours.config.sliding_window == 5
        ids = sample_ids(seed=7)
        with torch.no_grad():
            want = ref(input_ids=ids).logits
            assert (ours(ids) - want).abs().max().item() <= 1e-4
        hf.save_pretrained(ours, tmp_path / f"{case}_out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{case}_out",
                                                                 attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["qwen2_moe_sparse_step", "qwen3_moe"])
def test_cli_convert_round_trip(tmp_path, case):
    """``megacore convert`` HF -> megacore checkpoint -> HF: every tensor and config.json key back as they were."""
    assert_cli_convert_round_trip(case, tmp_path)


def test_export_refuses_a_parameter_no_hf_tensor_holds(tmp_path):
    """A parameter outside the family's weight mapping would be lost silently; export refuses it by name."""
    model = GPTModel(TransformerConfig(**_SMALL, qk_norm=True).validate())
    model.decoder.layers["0"].mlp.router.extra_bias = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match=r"qwen3_moe: it has no tensor for .*decoder\.layers\.0\.mlp\.router\.extra_bias"):
        hf.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
