"""Rotary scaling parity (Llama-3, YaRN, linear) against transformers, both directions.

transformers 5.x spells rotary settings as one ``rope_parameters`` dict (``rope_type``,
``rope_theta``, ``factor``, ...); 4.x used ``rope_theta`` + ``rope_scaling`` (``type``). Both load.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.hf_reference import VOCAB, build_hf, sample_ids, transformers

from megacore.config import TransformerConfig
from megacore.interop import hf
from megacore.models import GPTModel

SEQ = 48  # longer than the "original" context below, so the scaled frequencies matter
ROPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "mscale": 0.9, "mscale_all_dim": 0.5,
                    "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.5},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_scaling_parity(tmp_path, name):
    ref = build_hf("llama_gqa", seed=3, rope_parameters=dict(ROPES[name]))
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.load_pretrained(tmp_path / "hf")
    expected_kind = name.split("_")[0]
    assert ours.config.rotary_scaling == expected_kind
    ids = sample_ids(seed=4, seq=SEQ)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        assert (ours(ids) - ref_logits).abs().max().item() <= 1e-4
    # Round trip keeps the rotary block verbatim and HF reproduces its own logits from the export.
    hf.save_pretrained(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_parameters"] == json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref_logits, atol=0, rtol=0)


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_scratch_model_rope_export_parity(tmp_path, scaling):
    """A model built in megacore (no HF origin) exports a rope config HF computes identically."""
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=96, vocab_size=VOCAB, seq_length=64, rotary_base=500.0,
                               rotary_scaling=scaling, rotary_scaling_factor=4.0, rotary_original_max_positions=32,
                               rotary_mscale=0.8, init_std=0.1)
    ours = GPTModel(config, seed=5).eval()
    hf.save_pretrained(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = sample_ids(seed=6, seq=SEQ)
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_v4_rope_spelling_maps_like_v5():
    """4.x configs (top-level rope_theta, rope_scaling with 'type') give the same TransformerConfig."""
    common = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 96, "vocab_size": VOCAB, "max_position_embeddings": 128}
    for rope in ROPES.values():
        v5 = hf.config_from_hf({**common, "rope_parameters": dict(rope)})
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        if rope["rope_type"] != "default":
            scaling["type"] = rope["rope_type"]
        v4 = hf.config_from_hf({**common, "rope_theta": rope["rope_theta"], "rope_scaling": scaling})
        assert v4 == v5
