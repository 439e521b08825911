"""Bad inputs give clear errors naming the problem; loading never unpickles arbitrary objects."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.interop.hf_reference import build_hf, sample_ids

from megacore.config import ConfigError, TransformerConfig
from megacore.interop import hf
from megacore.models import GPTModel


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf("llama_gqa", seed=7).save_pretrained(path)
    return path


def _copy_with(src, dst, edit):
    """Copy an HF dir, passing its single safetensors dict through ``edit``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConfigError, match="unsupported") as err:
        hf.load_pretrained(tmp_path)
    for name in ("bert", "llama", "mistral", "qwen2", "gpt2", "LlamaForCausalLM"):
        assert name in str(err.value)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _copy_with(llama_dir, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hf.load_pretrained(bad)


def test_extra_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.2.mlp.up_proj.weight"
    bad = _copy_with(llama_dir, tmp_path / "bad", lambda t: {**t, name: torch.zeros(96, 64)})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hf.load_pretrained(bad)


def test_shape_mismatch_is_named(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _copy_with(llama_dir, tmp_path / "bad", lambda t: {**t, name: torch.zeros(48, 64)})
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(48, 64\).*\(32, 64\)"):
        hf.load_pretrained(bad)


def test_no_weights_is_a_clear_error(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='dynamic'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     "mixes sliding and full"),
])
def test_unrepresentable_hf_config(llama_dir, change, match):
    cfg = {**json.loads((llama_dir / "config.json").read_text()), **change}
    cfg.pop("layer_types", None)
    with pytest.raises(ConfigError, match=match):
        hf.config_from_hf(cfg)


def test_bin_only_dir_loads_with_weights_only(llama_dir, tmp_path):
    ref = hf.load_pretrained(llama_dir)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save(load_file(str(llama_dir / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="weights_only=True"):
        model = hf.load_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


class _Payload:
    """An object whose unpickling would run code: loading must refuse it, not execute it."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins._megacore_pwned = True",))


def test_bin_with_code_is_refused(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Payload()}, f)
    with pytest.warns(UserWarning), pytest.raises(pickle.UnpicklingError):
        hf.load_pretrained(tmp_path)
    import builtins

    assert not hasattr(builtins, "_megacore_pwned")


def test_overrides_dtype_and_no_padding(llama_dir):
    model = hf.load_pretrained(llama_dir, dtype=torch.bfloat16, vocab_padding_multiple=20,
                               attention_backend="reference")
    assert model.config.padded_vocab_size == 100 and model.config.attention_backend == "reference"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ConfigError, match="not_a_field"):
        hf.load_pretrained(llama_dir, not_a_field=1)


def test_export_refuses_what_hf_cannot_represent(tmp_path):
    small = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=16)
    with pytest.raises(ConfigError, match="qk_norm"):
        hf.save_pretrained(GPTModel(TransformerConfig(**small, qk_norm=True)), tmp_path / "a")
    with pytest.raises(ConfigError, match="normalization"):
        hf.save_pretrained(GPTModel(TransformerConfig(**small)), tmp_path / "b", family="gpt2")
    with pytest.raises(ConfigError, match="family='bert'"):
        hf.save_pretrained(GPTModel(TransformerConfig(**small)), tmp_path / "c", family="bert")
    with pytest.raises(ConfigError, match="moe_router_score"):  # Mixtral's router is softmax top-k only
        hf.save_pretrained(GPTModel(TransformerConfig(**small, num_experts=4, moe_router_score="sigmoid")),
                           tmp_path / "e", family="mixtral")
    stage = GPTModel(TransformerConfig(**small), pre_process=False)
    with pytest.raises(ValueError, match="pipeline stage"):
        hf.save_pretrained(stage, tmp_path / "d")
    assert not any(tmp_path.iterdir()), "failed saves must leave nothing behind"


def test_infer_family():
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4)
    assert hf.infer_family(TransformerConfig(**base)) == "llama"
    assert hf.infer_family(TransformerConfig(**base, sliding_window=8)) == "mistral"
    assert hf.infer_family(TransformerConfig(**base, add_qkv_bias=True)) == "qwen2"
    assert hf.infer_family(TransformerConfig(**base, position_embedding="learned", normalization="LayerNorm",
                                             activation="gelu_tanh", add_qkv_bias=True,
                                             add_bias_linear=True)) == "gpt2"


def test_gpt2_bare_checkpoint_with_mask_buffers(tmp_path):
    """The original ``gpt2`` hub layout: no ``transformer.`` prefix, stored causal-mask buffers."""
    ref = build_hf("gpt2_tied", seed=8)
    ref.save_pretrained(tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(bare, str(tmp_path / "bare" / "model.safetensors"), metadata={"format": "pt"})
    model = hf.load_pretrained(tmp_path / "bare")
    ids = sample_ids(seed=9)
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4
