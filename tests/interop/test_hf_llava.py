"""LLaVA against Hugging Face's ``LlavaForConditionalGeneration`` (the reference), fp32, CPU.

- A random tiny HF LLaVA (CLIP tower, Llama language model with GQA), saved by transformers, loads
  into ``LlavaModel``: logits on prompts with image tokens equal HF's within 1e-4; the vision
  features and the loss (against ``F.cross_entropy`` on HF's logits) too.
- ``save_pretrained_llava`` writes a directory transformers loads back to the same logits; a
  megacore -> HF -> megacore round trip is bit-exact.
- Bad inputs fail with errors that name the problem: image tokens that do not match the images,
  wrong image sizes, a non-LLaVA config, a checkpoint with missing tensors.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from megacore.config import ConfigError
from megacore.interop.hf_llava import load_pretrained_llava, save_pretrained_llava

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN, VOCAB = 119, 120


def _hf_model(select="default", layer=-2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_select_strategy=select, vision_feature_layer=layer)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF zero-initializes some biases; random ones test the mapping
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs(per_image, batch=2, seq=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB - 1, (batch, seq), generator=g)
    for b in range(batch):
        ids[b, 2 + b: 2 + b + per_image] = IMAGE_TOKEN
    pixels = torch.randn(batch, 3, 28, 28, generator=g)
    return ids, pixels


@pytest.fixture(scope="module", params=[("default", -2), ("full", 1)], ids=["default-2", "full1"])
def pair(request, tmp_path_factory):
    select, layer = request.param
    hf = _hf_model(select, layer)
    path = tmp_path_factory.mktemp("llava") / "hf"
    hf.save_pretrained(path)
    return hf, load_pretrained_llava(path), path


def test_logits_and_loss_match_hugging_face(pair):
    hf, ours, _ = pair
    ids, pixels = _inputs(ours.config.vision.image_seq_length)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4
        labels = torch.roll(ids, -1, 1)
        labels[ids == IMAGE_TOKEN] = -100
        loss = ours(ids, pixels, labels=labels)
        ref = F.cross_entropy(want.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        assert abs(loss.item() - ref.item()) < 1e-5


def test_image_features_match_hugging_face(pair):
    hf, ours, _ = pair
    _, pixels = _inputs(ours.config.vision.image_seq_length)
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=pixels)
        want = getattr(want, "pooler_output", want)  # transformers 5 wraps the per-image features
        want = torch.stack(list(want)) if isinstance(want, (list, tuple)) else want
        got = ours.image_features(pixels)
    assert (got.reshape(want.shape) - want).abs().max().item() < 1e-5


def test_save_loads_in_transformers_and_round_trips(pair, tmp_path):
    from transformers import LlavaForConditionalGeneration

    hf, ours, _ = pair
    out = save_pretrained_llava(ours, tmp_path / "ours")
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = _inputs(ours.config.vision.image_seq_length)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, pixel_values=pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits)
    again = load_pretrained_llava(out)
    for (name, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def train_steps(model, ids, pixels, steps=8) -> list[float]:
    """``steps`` AdamW steps (lr 3e-3) on next-token labels that skip the image tokens; the losses."""
    labels = torch.roll(ids, -1, 1)
    labels[ids == IMAGE_TOKEN] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, pixels, labels=labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_step_reduces_the_loss(pair):
    _, ours, path = pair
    model = load_pretrained_llava(path).train()
    losses = train_steps(model, *_inputs(model.config.vision.image_seq_length))
    assert model.vision_tower.patch_embedding.weight.grad.abs().sum() > 0  # gradients reach the image encoder
    assert losses[-1] < losses[0] - 0.5, losses


def test_bad_inputs_name_the_problem(pair, tmp_path):
    _, ours, path = pair
    n = ours.config.vision.image_seq_length
    ids, pixels = _inputs(n)
    with pytest.raises(ValueError, match=f"{2 * n - 1} image tokens.*{n} image tokens per image"):
        bad = ids.clone()
        bad[0, 2] = 5
        ours(bad, pixels)
    with pytest.raises(ValueError, match="resize the images"):
        ours(ids, torch.randn(2, 3, 32, 32))
    cfg = json.loads((path / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="not 'llava'"):
        load_pretrained_llava(broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop(next(k for k in tensors if k.endswith("layers.1.self_attn.q_proj.weight")))
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        load_pretrained_llava(broken)
    assert not os.path.exists(tmp_path / "never")


@pytest.mark.parametrize("change,field", [
    (dict(image_token_id=VOCAB), "vision.image_token_id"),
    (dict(feature_layer=-5), "vision.feature_layer"),
    (dict(feature_select="cls"), "vision.feature_select"),
    (dict(projector_activation="relu"), "vision.projector_activation"),
])
def test_bad_llava_configs_are_refused(pair, change, field):
    import dataclasses

    from megacore.models.llava import LlavaConfig

    _, ours, _ = pair
    with pytest.raises(ConfigError, match=field):
        LlavaConfig(ours.config.text, dataclasses.replace(ours.config.vision, **change)).validate()


def test_bad_vision_configs_are_refused():
    from megacore.config import VisionConfig

    with pytest.raises(ConfigError, match="vision.image_size=30 is not a multiple"):
        VisionConfig(image_size=30, patch_size=14).validate()
    with pytest.raises(ConfigError, match="vision.activation='swiglu'"):
        VisionConfig(activation="swiglu").validate()


def test_compiled_llava_equals_eager(pair):
    """compile_model compiles both towers' layers and the loss head (aot_eager here: the graphs,
    without a C++ compiler); the loss and its gradients equal eager's."""
    from megacore.training.compile import compile_model

    _, _, path = pair
    eager, compiled = load_pretrained_llava(path).train(), compile_model(load_pretrained_llava(path).train(),
                                                                         backend="aot_eager")
    ids, pixels = _inputs(eager.config.vision.image_seq_length)
    labels = torch.roll(ids, -1, 1)
    for m in (eager, compiled):
        m(ids, pixels, labels=labels).backward()
    assert abs(compiled(ids, pixels, labels=labels).item() - eager(ids, pixels, labels=labels).item()) < 1e-5
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.grad is not None:
            assert (a.grad - b.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("freeze", [False, True])
def test_vision_flops_match_torch_flop_counter(pair, freeze):
    """vision_flops_per_token against torch's FLOP counter (matmuls and convolutions) over the image
    side's forward and backward: the same count. The tower's attention runs its plain-matmul
    reference here, since the counter does not see CPU SDPA's kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    from megacore.training.flops import vision_flops_per_token

    _, _, path = pair
    model = load_pretrained_llava(path).train()
    model.config.vision.freeze_tower = freeze
    model.vision_tower.requires_grad_(not freeze)
    model.vision_tower.post_norm.requires_grad_(False)
    for layer in list(model.vision_tower.encoder.layers.values())[model.config.vision.layers_used:]:
        layer.requires_grad_(False)
    for layer in model.vision_tower.encoder.layers.values():
        layer.self_attention.core_attention.backend = "reference"
    _, pixels = _inputs(model.config.vision.image_seq_length)
    with FlopCounterMode(display=False) as counter:
        model.image_features(pixels).square().sum().backward()
    seq = 16
    want = counter.get_total_flops()
    got = vision_flops_per_token(model.config.vision, model.config.text.hidden_size, seq) * seq * pixels.shape[0]
    assert abs(got - want) / want < 1e-9, (got, want)


def test_greedy_generation_matches_hugging_face(pair):
    """LlavaModel.generate (images prefilled into the KV cache once) continues the prompts with the
    same tokens as HF's greedy ``generate``."""
    hf, ours, _ = pair
    ids, pixels = _inputs(ours.config.vision.image_seq_length, seq=10)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                           attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, pixels, max_new_tokens=8)
    assert torch.equal(got, want), (got, want)
    with pytest.raises(ValueError, match="exceed model.seq_length"):
        ours.generate(ids, pixels, max_new_tokens=ours.config.text.seq_length)
