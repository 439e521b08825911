"""``megacore convert``: HF -> megacore checkpoint -> HF reproduces every tensor bit for bit, and the
checkpoint in between loads into a model that matches the HF model's weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from megacore.checkpoint import load_checkpoint  # noqa: E402
from megacore.checkpoint.convert import main as convert_main  # noqa: E402
from megacore.cli import main as cli_main  # noqa: E402

CASES = {
    "llama_gqa": dict(num_key_value_heads=2),
    "llama_tied_bias": dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def _hf_dir(tmp_path, case):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, **CASES[case])
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    out = tmp_path / "hf"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _tensors(d):
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_megacore_hf_round_trip_is_exact(tmp_path, case):
    hf = _hf_dir(tmp_path, case)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert_main(["--from", "hf", "--input", str(hf), "--output", str(ckpt), "--step", "7"]) == 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000007"
    assert cli_main(["convert", "--from", "megacore", "--input", str(ckpt), "--output", str(back)]) == 0
    original, exported = _tensors(hf), _tensors(back)
    original = {k: v for k, v in original.items() if not (CASES[case].get("tie_word_embeddings") and k == "lm_head.weight")}
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert torch.equal(exported[name], t), name
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (hf, back))
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
                "tie_word_embeddings", "intermediate_size"):
        assert cfg_out.get(key) == cfg_in.get(key), key

    # The checkpoint itself holds the HF weights in megacore layout: compare with load_pretrained.
    from megacore.interop.hf import load_pretrained
    reference = load_pretrained(str(hf))
    from megacore.models.gpt import GPTModel
    model = GPTModel(reference.config, seed=3)
    load_checkpoint(str(ckpt), model, load_rng=False)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n


def test_convert_reports_bad_input(tmp_path, capsys):
    assert convert_main(["--from", "megacore", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_main(["--from", "megacore", "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_convert_refuses_an_output_holding_training_checkpoints(tmp_path, capsys):
    """Converting into a training run's directory would repoint 'latest' to the converted step, and the
    next run there would resume from it and overwrite the later checkpoints: refused without --force."""
    hf = _hf_dir(tmp_path, "llama_gqa")
    ckpt = tmp_path / "train_ckpt"
    first = ["--from", "hf", "--input", str(hf), "--output", str(ckpt), "--step", "10"]
    assert convert_main(first) == 0  # stands in for a training run's checkpoint at step 10
    capsys.readouterr()
    args = ["--from", "hf", "--input", str(hf), "--output", str(ckpt)]
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "iter_0000010" in err and "--force" in err
    assert (ckpt / "latest").read_text().strip() == "iter_0000010"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000010"]
    # A directory holding only an unfinished save counts too (it belongs to a training run).
    partial = tmp_path / "partial"
    (partial / "iter_0000003.tmp").mkdir(parents=True)
    assert convert_main(["--from", "hf", "--input", str(hf), "--output", str(partial)]) == 2
    capsys.readouterr()
    # --force writes there, as told.
    assert convert_main([*args, "--force"]) == 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000000"
    assert (ckpt / "iter_0000010").is_dir()
