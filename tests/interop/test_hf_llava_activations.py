"""LLaVA activation names both ways against transformers: a megacore LLaVA with GELU-tanh in its
projector and vision tower exports names transformers loads (``gelu_pytorch_tanh``, not megacore's
``gelu_tanh``) with the same logits, and the names transformers writes load back."""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.test_hf_llava import IMAGE_TOKEN, VOCAB, _inputs

from megacore.config import TransformerConfig, VisionConfig
from megacore.interop.hf_llava import load_pretrained_llava, save_pretrained_llava
from megacore.models.llava import LlavaConfig, LlavaModel

transformers = pytest.importorskip("transformers")


def _megacore_llava(activation: str, projector_activation: str) -> LlavaModel:
    text = TransformerConfig(num_layers=2, hidden_size=48, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=96, vocab_size=VOCAB, seq_length=64, init_std=0.1)
    vision = VisionConfig(enabled=True, image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_layers=3, num_attention_heads=4, activation=activation, image_token_id=IMAGE_TOKEN,
                          projector_activation=projector_activation)
    model = LlavaModel(LlavaConfig(text, vision).validate(), seed=4).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # biases start at 0 and norms at 1: move them so a wrong mapping would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("activation,projector", [("gelu_tanh", "gelu_tanh"), ("quick_gelu", "gelu_tanh"),
                                                  ("gelu", "gelu")])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, activation, projector):
    ours = _megacore_llava(activation, projector)
    save_pretrained_llava(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    names = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
    assert cfg["projector_hidden_act"] == names[projector]
    assert cfg["vision_config"]["hidden_act"] == names[activation]

    theirs, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, pixels = _inputs(ours.config.vision.image_seq_length)
    with torch.no_grad():
        want = ours(ids, pixels)
        assert (theirs.eval()(input_ids=ids, pixel_values=pixels).logits - want).abs().max().item() < 1e-4

    back = load_pretrained_llava(tmp_path / "out")
    assert back.config.vision == ours.config.vision
    for (name, a), (_, b) in zip(ours.named_parameters(), back.named_parameters()):
        if "word_embeddings" in name or "output_layer" in name:  # padding rows come back as zeros
            a, b = a[:VOCAB], b[:VOCAB]
        assert torch.equal(a, b), name


@pytest.mark.parametrize("projector,vision", [("gelu_pytorch_tanh", "gelu_pytorch_tanh"), ("gelu_new", "gelu_new")])
def test_transformers_names_load(tmp_path, projector, vision):
    """A transformers LLaVA whose projector and tower use GELU-tanh, under the names transformers
    writes, loads as megacore ``gelu_tanh`` with transformers' logits."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HFLlavaConfig

    cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=28, patch_size=14, hidden_act=vision),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
        image_token_index=IMAGE_TOKEN, projector_hidden_act=projector)
    torch.manual_seed(6)
    theirs = transformers.LlavaForConditionalGeneration(cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_pretrained_llava(tmp_path / "hf")
    assert (ours.config.vision.projector_activation, ours.config.vision.activation) == ("gelu_tanh", "gelu_tanh")
    ids, pixels = _inputs(ours.config.vision.image_seq_length)
    with torch.no_grad():
        want = theirs(input_ids=ids, pixel_values=pixels).logits
        assert (ours(ids, pixels) - want).abs().max().item() < 1e-4
