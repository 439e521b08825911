"""Rotary embeddings against an independent complex-number formulation and Hugging Face's rope init."""

import math

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.layers.rotary import RotaryEmbedding, apply_rotary_reference, rotary_inv_freq
from tests.layers import reference as ref

B, S, N, D = 2, 24, 3, 16


def _config(**kw) -> TransformerConfig:
    base = dict(hidden_size=N * D, num_attention_heads=N, seq_length=64, rotary_base=500.0)
    base.update(kw)
    return TransformerConfig(**base).validate()


def _x(dtype=torch.float32):
    return torch.randn(B, S, N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def test_standard_rotary_matches_complex_formulation():
    cfg = _config()
    rot = RotaryEmbedding(cfg)
    cos, sin = rot(S, "cpu", torch.float32)
    assert cos.shape == sin.shape == (S, D)
    x = _x()
    out = apply_rotary_reference(x, cos, sin)
    expected = ref.rope_complex(x, torch.arange(S), ref.rope_inv_freq(D, 500.0))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)
    # A rotation keeps every pair's norm.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_inv_freq_standard_matches_formula():
    inv, scale = rotary_inv_freq(_config())
    torch.testing.assert_close(inv.double(), ref.rope_inv_freq(D, 500.0), rtol=1e-12, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("percent", [0.5, 0.25])
def test_partial_rotary_rotates_head_and_leaves_tail_untouched(percent):
    cfg = _config(rotary_percent=percent)
    rd = int(D * percent)
    cos, sin = RotaryEmbedding(cfg)(S, "cpu", torch.float32)
    assert cos.shape == (S, rd)
    x = _x()
    out = apply_rotary_reference(x, cos, sin)
    assert torch.equal(out[..., rd:], x[..., rd:])  # bit-for-bit untouched
    # Frequencies are those of a rotary_dim-wide embedding (Megatron/HF partial-rotary convention).
    expected = ref.rope_complex(x[..., :rd], torch.arange(S), ref.rope_inv_freq(rd, 500.0))
    torch.testing.assert_close(out[..., :rd].double(), expected, rtol=1e-5, atol=2e-5)


def test_position_ids_path_equals_default_path():
    cfg = _config()
    rot = RotaryEmbedding(cfg)
    cos, sin = rot(S, "cpu", torch.float32)
    pos = torch.arange(S)[None].expand(B, S)
    cos_p, sin_p = rot(S, "cpu", torch.float32, position_ids=pos)
    assert cos_p.shape == (B, S, D)
    torch.testing.assert_close(cos_p, cos[None].expand(B, S, D), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_p, sin[None].expand(B, S, D), rtol=0, atol=1e-6)
    x = _x()
    torch.testing.assert_close(apply_rotary_reference(x, cos_p, sin_p), apply_rotary_reference(x, cos, sin),
                               rtol=0, atol=1e-6)


def test_position_ids_with_offsets_per_sample():
    """Row b uses positions offset_b + t: equal to the complex formula at those positions."""
    cfg = _config()
    rot = RotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(S) + 5, torch.arange(S).flip(0)])  # any positions, per sample
    cos, sin = rot(S, "cpu", torch.float32, position_ids=pos)
    x = _x()
    expected = ref.rope_complex(x, pos, ref.rope_inv_freq(D, 500.0))
    torch.testing.assert_close(apply_rotary_reference(x, cos, sin).double(), expected, rtol=1e-5, atol=2e-5)
    # And equal to the default table of a longer sequence, sliced at those positions.
    cos_long, _ = rot(2 * S, "cpu", torch.float32)
    torch.testing.assert_close(cos[0], cos_long[5:5 + S], rtol=0, atol=1e-6)


def test_bf16_cos_sin_and_rotation():
    rot = RotaryEmbedding(_config())
    cos, sin = rot(S, "cpu", torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    x = _x(torch.bfloat16)
    out = apply_rotary_reference(x, cos, sin)
    assert out.dtype == torch.bfloat16
    expected = ref.rope_complex(x, torch.arange(S), ref.rope_inv_freq(D, 500.0))
    # |x| ~ 3 at most; cos/sin and the products each round to 8 bits: 3 roundings of 2^-9 relative.
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -6, atol=2 ** -5)


# ------------------------------------------------------------------- scaled variants vs Hugging Face

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HD = 32  # a larger head dim gives frequencies in all three llama3 / yarn bands


def _hf_config(rope_parameters: dict):
    # transformers 5.x: everything about RoPE lives in `rope_parameters` (rope_theta, rope_type,
    # partial_rotary_factor, factor, original_max_position_embeddings, ...).
    return transformers.LlamaConfig(hidden_size=2 * HD, num_attention_heads=2, head_dim=HD,
                                    max_position_embeddings=512, rope_parameters=dict(rope_parameters))


SCALED_CASES = {
    "linear": (dict(rotary_scaling="linear", rotary_scaling_factor=4.0),
               dict(rope_type="linear", factor=4.0)),
    "llama3": (dict(rotary_scaling="llama3", rotary_scaling_factor=8.0, rotary_original_max_positions=64,
                    rotary_low_freq_factor=1.0, rotary_high_freq_factor=4.0),
               dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64,
                    low_freq_factor=1.0, high_freq_factor=4.0)),
    "yarn": (dict(rotary_scaling="yarn", rotary_scaling_factor=4.0, rotary_original_max_positions=128,
                  rotary_beta_fast=32.0, rotary_beta_slow=1.0),
             dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0)),
    "yarn_mscale": (dict(rotary_scaling="yarn", rotary_scaling_factor=40.0, rotary_original_max_positions=128,
                         rotary_mscale=0.8, rotary_mscale_all_dim=0.6),
                    dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=128,
                         mscale=0.8, mscale_all_dim=0.6)),
    "yarn_partial": (dict(rotary_scaling="yarn", rotary_scaling_factor=4.0, rotary_original_max_positions=128,
                          rotary_percent=0.5),
                     dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                          partial_rotary_factor=0.5)),
    "llama3_partial": (dict(rotary_scaling="llama3", rotary_scaling_factor=8.0, rotary_original_max_positions=64,
                            rotary_percent=0.5),
                       dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64,
                            low_freq_factor=1.0, high_freq_factor=4.0, partial_rotary_factor=0.5)),
}


@pytest.mark.parametrize("case", sorted(SCALED_CASES))
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_scaled_inv_freq_matches_transformers(case, base):
    ours, theirs = SCALED_CASES[case]
    cfg = TransformerConfig(hidden_size=2 * HD, num_attention_heads=2, kv_channels=HD, seq_length=512,
                            rotary_base=base, **ours).validate()
    hf = _hf_config(dict(theirs, rope_theta=base))
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](hf, "cpu")
    inv, scale = rotary_inv_freq(cfg)
    assert inv.shape == hf_inv.shape == (cfg.rotary_dim // 2,)
    # HF computes in fp32; ours in fp64.
    torch.testing.assert_close(inv.double(), hf_inv.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf_scale, rel=1e-12)
    if case == "llama3":
        # The config really exercises the three llama3 bands: kept, divided by factor, smoothed.
        plain = ref.rope_inv_freq(HD, base)
        ratio = plain / inv.double()
        assert (ratio - 1).abs().min() < 1e-9 and (ratio - 8).abs().min() < 1e-9
        assert ((ratio > 1.001) & (ratio < 7.999)).any()


def test_scaled_rotary_applies_attention_scaling_to_cos_sin():
    """YaRN's attention factor multiplies cos and sin: the rotation becomes a rotation times that factor."""
    ours, theirs = SCALED_CASES["yarn_mscale"]
    cfg = TransformerConfig(hidden_size=2 * HD, num_attention_heads=2, kv_channels=HD, seq_length=512,
                            **ours).validate()
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(dict(theirs, rope_theta=10000.0)), "cpu")
    assert hf_scale != 1.0
    cos, sin = RotaryEmbedding(cfg)(S, "cpu", torch.float32)
    x = torch.randn(B, S, 2, HD, generator=torch.Generator().manual_seed(3))
    expected = ref.rope_complex(x, torch.arange(S), hf_inv.double(), scale=hf_scale)
    torch.testing.assert_close(apply_rotary_reference(x, cos, sin).double(), expected, rtol=1e-5, atol=2e-5)
    assert math.isclose(float(cos[0, 0]), hf_scale, rel_tol=1e-6)


def test_rotary_built_on_meta_device_still_works():
    """A model built under ``torch.device('meta')`` must still produce real cos/sin after materialize."""
    with torch.device("meta"):
        rot = RotaryEmbedding(_config())
    cos, _ = rot(S, "cpu", torch.float32)
    assert cos.device.type == "cpu"
    torch.testing.assert_close(cos, RotaryEmbedding(_config())(S, "cpu", torch.float32)[0])
