"""``megacore generate``: greedy decoding reproduces transformers' own ``generate(do_sample=False)``
token for token (from the HF directory and from a megacore checkpoint of it), seeded sampling is
deterministic, and bad inputs give clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from megacore.inference.generate import GenerateError, build_parser, detect_format, load_model, main, run  # noqa: E402
from megacore.inference.sampling import filter_logits, generate, next_token  # noqa: E402

VOCAB = 100
EOS = 2  # LlamaConfig's default eos_token_id, also "</s>" in the test tokenizer
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]


def _tokenizer_json(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(path))


def _hf_model(seed=0, **overrides):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if p.dim() == 1 else 0.3 * noise)  # peaked, varied next-token choices
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF model, its saved directory with a tokenizer.json)."""
    model = _hf_model()
    out = tmp_path_factory.mktemp("gen") / "hf"
    model.save_pretrained(str(out), safe_serialization=True)
    _tokenizer_json(out / "tokenizer.json")
    return model, out


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    from megacore.checkpoint.convert import hf_to_megacore

    out = tmp_path_factory.mktemp("gen") / "ckpt"
    hf_to_megacore(str(hf[1]), str(out), step=3)
    return out


def _hf_greedy(model, prompt, n, eos=None):
    model.generation_config.eos_token_id = eos
    try:
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        model.generation_config.eos_token_id = EOS
    return out[0, len(prompt):].tolist()


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


PROMPT = [5, 17, 42, 8, 99, 3]


def test_greedy_matches_transformers_generate(hf):
    model, path = hf
    loaded = load_model(str(path))
    assert loaded.kind == "hf" and loaded.eos_ids == [EOS]
    expected = _hf_greedy(model, PROMPT, 24)
    got = generate(loaded.model, torch.tensor(PROMPT), 24)[len(PROMPT):].tolist()
    assert got == expected
    assert len(set(expected)) > 3, "degenerate reference: the test would not see a wrong token"

    # Stopping at an end-of-sequence id: choose one HF emits mid-way; both must stop right there.
    stop = expected[len(expected) // 2]
    ref = _hf_greedy(model, PROMPT, 24, eos=stop)
    assert ref[-1] == stop and len(ref) <= len(expected) // 2 + 1
    got = generate(loaded.model, torch.tensor(PROMPT), 24, eos_ids=[stop])[len(PROMPT):].tolist()
    assert got == ref


def test_cli_with_text_prompt_matches_transformers(hf, capsys):
    model, path = hf
    prompt = "w10 w20 w30 w40"
    ids = [WORDS.index(w) for w in prompt.split()]
    model.generation_config.eos_token_id = EOS  # HF stops at config.json's eos, and so must we
    expected = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, pad_token_id=0,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    rc, out, err = _cli(capsys, "--model", path, "--prompt", prompt, "--max-new-tokens", 16, "--ids",
                        "--device", "cpu")
    assert rc == 0, err
    text, id_line = out.strip().splitlines()
    assert [int(x) for x in id_line.split()] == ids + expected
    assert text.split() == [WORDS[i] for i in ids + expected]


def test_static_decoder_gives_the_loops_tokens_and_auto_picks_by_device(hf, capsys):
    """--decoder static (preallocated cache, device-side steps; CUDA graphs on a GPU) decodes the
    transformers-greedy tokens the loop does, stopping at the same eos; auto is the loop on the CPU."""
    model, path = hf
    model.generation_config.eos_token_id = EOS
    expected = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=16, pad_token_id=0,
                              attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):].tolist()
    results = {}
    for decoder in ("static", "loop", "auto"):
        args = build_parser().parse_args(["--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)),
                                          "--max-new-tokens", "16", "--device", "cpu", "--decoder", decoder])
        results[decoder] = run(args)
    assert results["static"]["new_ids"] == results["loop"]["new_ids"] == expected
    assert [r["decoder"] for r in results.values()] == ["static", "loop", "loop"]


def test_static_decoder_refusals_name_the_fix(hf, capsys):
    _, path = hf
    rc, _, err = _cli(capsys, "--model", path, "--prompt-ids", "3,4", "--max-new-tokens", 10_000, "--device", "cpu",
                      "--decoder", "static")
    assert rc == 2 and "--decoder static" in err and "--decoder loop" in err
    rc, _, err = _cli(capsys, "--model", path, "--prompt-ids", "3,4", "--device", "cpu", "--compile")
    assert rc == 2 and "--compile applies to the static decoder" in err


def test_checkpoint_generates_like_the_hf_directory(hf, ckpt, capsys):
    assert detect_format(str(ckpt)) == "megacore"
    loaded = load_model(str(ckpt))
    assert loaded.kind == "megacore" and loaded.eos_ids == [EOS]  # the HF config travels in the checkpoint
    expected = _hf_greedy(hf[0], PROMPT, 12)
    assert generate(loaded.model, torch.tensor(PROMPT), 12)[len(PROMPT):].tolist() == expected
    # The tokenizer is found in the HF directory the checkpoint was converted from.
    rc, out, err = _cli(capsys, "--model", ckpt, "--prompt", "w1 w2 w3", "--max-new-tokens", 4, "--device", "cpu")
    assert rc == 0, err
    assert out.split()[:3] == ["w1", "w2", "w3"]


def test_checkpoint_without_recorded_config_needs_and_uses_config(hf, ckpt, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    it = bare / (bare / "latest").read_text().strip()
    index = json.loads((it / "index.json").read_text())
    model_cfg = index.pop("model_config")
    (it / "index.json").write_text(json.dumps(index))
    # As a checkpoint of an older format wrote it: no model config, and a COMPLETE marker without
    # the index digest (which would otherwise, rightly, reject the edited index).
    marker = json.loads((it / "COMPLETE").read_text())
    marker.pop("index", None)
    (it / "COMPLETE").write_text(json.dumps(marker))
    rc, _, err = _cli(capsys, "--model", bare, "--prompt-ids", "1,2,3", "--max-new-tokens", 2)
    assert rc == 2 and "records no model config" in err and "--config" in err

    from megacore.config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {k: v for k, v in model_cfg.items() if k in fields},
                                        "data": {"source": "mock"}}))
    rc, out, err = _cli(capsys, "--model", bare, "--config", cfg_file, "--prompt-ids", ",".join(map(str, PROMPT)),
                        "--max-new-tokens", 10, "--ignore-eos", "--device", "cpu")
    assert rc == 0, err
    assert [int(x) for x in out.split()] == PROMPT + _hf_greedy(hf[0], PROMPT, 10)


def test_sampling_with_a_seed_is_deterministic(hf, capsys):
    path = hf[1]
    args = ["--model", path, "--prompt-ids", "5,17,42", "--max-new-tokens", 20, "--temperature", 1.5,
            "--top-k", 40, "--top-p", 0.95, "--ignore-eos", "--device", "cpu"]
    runs = [_cli(capsys, *args, "--seed", s) for s in (7, 7, 8)]
    assert all(rc == 0 for rc, _, _ in runs)
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]

    loaded = load_model(str(path))
    a = generate(loaded.model, torch.tensor(PROMPT), 15, temperature=1.0, seed=3)
    b = generate(loaded.model, torch.tensor(PROMPT), 15, temperature=1.0, seed=3)
    assert torch.equal(a, b)
    # top-k 1 and a tiny top-p leave one candidate: sampling then equals greedy.
    greedy = generate(loaded.model, torch.tensor(PROMPT), 10)
    assert torch.equal(generate(loaded.model, torch.tensor(PROMPT), 10, temperature=2.0, top_k=1, seed=0), greedy)
    assert torch.equal(generate(loaded.model, torch.tensor(PROMPT), 10, temperature=2.0, top_p=1e-6, seed=0), greedy)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.2, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, False, False]]
    # top-p 0.65: 0.4 alone is short of it, 0.4 + 0.3 reaches it -> keep exactly those two
    assert torch.isfinite(filter_logits(logits, top_p=0.65)).tolist() == [[False, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.71)).tolist() == [[False, True, True, True, False]]
    assert torch.isfinite(filter_logits(logits)).all()
    # Draws follow the filtered distribution: never a removed token.
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {1, 2}


def test_batched_rows_stop_independently():
    class Fixed(torch.nn.Module):
        """Logits that always favour (last token + 1) mod 6."""

        def forward(self, ids):
            return torch.nn.functional.one_hot((ids + 1) % 6, 6).float()

    out = generate(Fixed(), torch.tensor([[0], [3]]), 8, eos_ids=[4])
    # row 1 stops first and is padded with its eos; the loop ends once row 0 emits eos too
    assert out.tolist() == [[0, 1, 2, 3, 4], [3, 4, 4, 4, 4]]
    assert generate(Fixed(), torch.tensor([[0], [3]]), 8).shape == (2, 9)  # no eos: runs to the limit


def test_bad_paths_and_arguments_give_clear_errors(hf, tmp_path, capsys):
    rc, _, err = _cli(capsys, "--model", tmp_path / "missing", "--prompt", "w1")
    assert rc == 2 and "does not exist" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.pt").write_bytes(b"")
    rc, _, err = _cli(capsys, "--model", tmp_path / "junk", "--prompt", "w1")
    assert rc == 2 and "neither a Hugging Face model directory" in err and "weights.pt" in err
    rc, _, err = _cli(capsys, "--model", tmp_path / "junk" / "weights.pt", "--prompt", "w1")
    assert rc == 2 and "is a file" in err
    with pytest.raises(GenerateError, match="does not exist"):
        load_model(str(tmp_path / "missing"))

    no_tok = tmp_path / "no_tok"
    hf[0].save_pretrained(str(no_tok), safe_serialization=True)
    rc, _, err = _cli(capsys, "--model", no_tok, "--prompt", "w1", "--device", "cpu")
    assert rc == 2 and "no tokenizer found" in err and "--tokenizer" in err
    rc, _, err = _cli(capsys, "--model", no_tok, "--prompt-ids", "1,500", "--device", "cpu")
    assert rc == 2 and "outside the model's vocabulary" in err
    rc, _, err = _cli(capsys, "--model", hf[1], "--prompt", "w1", "--top-p", "0")
    assert rc == 2 and "top_p" in err
    rc, _, err = _cli(capsys, "--model", hf[1], "--prompt", "w1", "--tokenizer", tmp_path / "nope.json")
    assert rc == 2 and "tokenizer" in err and "does not exist" in err


def test_run_returns_ids_and_text(hf):
    args = build_parser().parse_args(["--model", str(hf[1]), "--prompt", "w5 w6", "--max-new-tokens", "3",
                                      "--device", "cpu", "--ignore-eos"])
    result = run(args)
    assert result["format"] == "hf" and result["prompt_ids"] == [8, 9] and len(result["new_ids"]) == 3
    assert result["text"].split()[:2] == ["w5", "w6"]


def test_training_checkpoint_finds_the_tokenizer_its_run_recorded(hf, tmp_path, capsys):
    """A training checkpoint whose ``extra`` carries the run config (``run_config.data``) needs no
    --tokenizer/--config: the run's tokenizer is rebuilt from its data section."""
    from megacore.checkpoint import save_checkpoint
    from megacore.config import TransformerConfig
    from megacore.models import GPTModel

    model = GPTModel(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                                       seq_length=16), seed=3)
    run_config = {"data": {"source": "mock", "tokenizer": str(hf[1] / "tokenizer.json")}}
    save_checkpoint(str(tmp_path / "run"), 1, model, extra={"run_config": run_config}).wait()
    rc, out, err = _cli(capsys, "--model", tmp_path / "run", "--prompt", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
                        "--max-new-tokens", 8, "--ignore-eos", "--ids", "--device", "cpu")
    assert rc == 0, err
    text, ids = out.strip().splitlines()
    assert len(ids.split()) == 20 and text.split()[:12] == [f"w{i}" for i in range(1, 13)]
    # 20 tokens > seq_length=16: the loop feeds the model only the last 16 (its window)
    model.eval()
    expected = generate(model, torch.tensor([int(i) for i in ids.split()[:12]]), 8)
    assert [int(i) for i in ids.split()] == expected.tolist()


def test_mixtral_greedy_matches_transformers_generate(tmp_path):
    """MoE layers in the KV-cache decode path: a Mixtral checkpoint decodes HF's tokens."""
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else
                    0.3 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(str(tmp_path), safe_serialization=True)
    loaded = load_model(str(tmp_path))
    expected = _hf_greedy(model, PROMPT, 16)
    assert len(set(expected)) > 3, "degenerate reference"
    assert generate(loaded.model, torch.tensor(PROMPT), 16)[len(PROMPT):].tolist() == expected
