"""Damaged or unusual Hugging Face directories give one error naming the file (or the key, or the
tensor) instead of a traceback from deep inside: config.json that is not JSON or not an object,
zero heads, garbage safetensors and shard indices, integer weights; and the parameter dtype of a
load follows a stated rule, not the first tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megacore.config import ConfigError, TransformerConfig
from megacore.interop import hf
from megacore.models import GPTModel

SMALL = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             vocab_size=64, seq_length=16)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama directory written by megacore itself (fp32 weights, "dtype": "float32")."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "llama"
    hf.save_pretrained(GPTModel(TransformerConfig(**SMALL)), out)
    return out


def _copy(src, dst, config=None, tensors=None):
    """A copy of HF dir ``src`` with config.json / the weights passed through the given edits."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    weights = load_file(str(src / "model.safetensors"))
    save_file(tensors(weights) if tensors else weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_config_json_that_is_not_a_json_object_is_named(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "list")
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list/config\.json holds a JSON list"):
        hf.load_pretrained(bad)
    (bad / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match=r"list/config\.json is not valid JSON .*line 1"):
        hf.load_pretrained(bad)


@pytest.mark.parametrize("key,value", [("num_attention_heads", 0), ("num_hidden_layers", -1), ("hidden_size", 3.5),
                                       ("vocab_size", "many")])
def test_counts_in_config_json_must_be_positive_integers(llama_dir, tmp_path, key, value):
    bad = _copy(llama_dir, tmp_path / "bad", config=lambda c: {**c, key: value})
    with pytest.raises(ConfigError, match=rf"config\.json: {key}={value!r} in config\.json must be a positive integer"):
        hf.load_pretrained(bad)


def test_garbage_safetensors_and_index_name_their_file(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "garbage")
    (bad / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"garbage/model\.safetensors is not a readable safetensors file"):
        hf.load_pretrained(bad)
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        hf.load_pretrained(bad)


def test_integer_weights_are_refused_not_cast(llama_dir, tmp_path):
    name = "model.norm.weight"
    bad = _copy(llama_dir, tmp_path / "int", tensors=lambda t: {**t, name: torch.ones_like(t[name], dtype=torch.int8)})
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*torch.int8.*dequantized"):
        hf.load_pretrained(bad)


def test_default_dtype_is_config_json_then_the_weights_never_the_first_tensor(llama_dir, tmp_path):
    """config.json's dtype wins (bfloat16 over fp32 weights); without one, weights of one dtype give
    it; weights of two dtypes (here only the first tensor differs) are an error asking for dtype=."""
    as_bf16 = _copy(llama_dir, tmp_path / "cfg_bf16", config=lambda c: {**c, "dtype": "bfloat16"})
    assert {p.dtype for p in hf.load_pretrained(as_bf16).parameters()} == {torch.bfloat16}

    def drop_dtype(c):
        return {k: v for k, v in c.items() if k not in ("dtype", "torch_dtype")}

    def half_but_first(t):
        first = sorted(t)[0]
        return {k: v if k == first else v.half() for k, v in t.items()}

    half = _copy(llama_dir, tmp_path / "half", config=drop_dtype, tensors=lambda t: {k: v.half() for k, v in t.items()})
    assert {p.dtype for p in hf.load_pretrained(half).parameters()} == {torch.float16}
    mixed = _copy(llama_dir, tmp_path / "mixed", config=drop_dtype, tensors=half_but_first)
    with pytest.raises(ValueError, match=r"mix \['torch.float16', 'torch.float32'\].*dtype="):
        hf.load_pretrained(mixed)
    assert {p.dtype for p in hf.load_pretrained(mixed, dtype=torch.float32).parameters()} == {torch.float32}


def test_generate_cli_reports_a_bad_directory_in_one_line(llama_dir, tmp_path, capsys):
    from megacore.inference.generate import main

    bad = _copy(llama_dir, tmp_path / "heads", config=lambda c: {**c, "num_attention_heads": 0})
    assert main(["--model", str(bad), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "num_attention_heads=0" in err, err
