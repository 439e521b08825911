"""docs/finetune-hf.md, run as written: its ``megacore preprocess`` and ``megacore train`` commands
(real subprocesses, CI-sized overrides appended) on a tiny random HF Llama with a tiny tokenizer
built here, then its Python snippet (transformers loads the export and generates).

Checked against independent references: the loss falls; transformers' logits of the export equal
those of megacore's final checkpoint read by megacore's own loader (fp32, 1e-4); the export carries
the source's token ids, generation config and tokenizer, with 0755/0644 modes under umask 022; a
run resumed at TP2 exports the checkpoint's weights (gathered from the shards), not the HF
source's; a contradicting override is one line on the terminal."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.interop.hf_reference import read_safetensors_dir, transformers

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "finetune-hf.md"
HF_DIR, OUT = "hf/smollm2", "out/smollm2-ft"   # the paths the doc uses, made under tmp_path here
CI = ["model.seq_length=32", "train.iters=30", "train.lr=3e-3", "train.warmup_iters=3", "log.interval=10"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _commands() -> list[list[str]]:
    """The ``megacore ...`` lines of the doc's bash block that preprocesses and trains."""
    block = next(b for b in _blocks("bash") if "megacore train" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.startswith("megacore ")]


def _tiny_model_dir(root: Path) -> None:
    """A tiny random Llama with token ids, and a byte-level BPE tokenizer.json (300 ids) for it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"def add_{i}(x):\n    return x + {i % 10}\n" for i in range(160)]
    with open(root / "corpus.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    out = root / HF_DIR
    out.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<s>", "eos_token": "</s>",
                                                           "pad_token": "<pad>"}))
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MEGACORE_CACHE=str(cwd / "cache"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["MEGACORE_BACKEND"] = "gloo"
    assert args[0] == "megacore"
    args = [a.replace("configs/", f"{ROOT}/configs/", 1) if a.startswith("configs/") else a for a in args[1:]]
    return subprocess.run([sys.executable, "-m", "megacore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    _tiny_model_dir(root)
    preprocess, train = _commands()
    assert preprocess[:2] == ["megacore", "preprocess"] and train[:2] == ["megacore", "train"]
    old = os.umask(0o022)
    try:
        _ok(_run(preprocess, root))
        log = _ok(_run(train + CI, root))
    finally:
        os.umask(old)
    return root, train, log


def test_loss_falls_and_the_export_is_the_final_model(example):
    root, _, log = example
    with open(root / "runs" / "finetune_hf" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0, losses
    assert "exported step 30" in log

    from megacore.inference.generate import load_model

    theirs = transformers.AutoModelForCausalLM.from_pretrained(root / OUT, attn_implementation="eager").eval()
    ours = load_model(str(root / "runs" / "finetune_hf" / "ckpt"), dtype=torch.float32).model
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(input_ids=ids).logits
        got = ours(ids)[..., :ref.shape[-1]]
    assert ref.dtype == torch.float32 and (got - ref).abs().max().item() <= 1e-4


def test_export_carries_ids_generation_config_tokenizer_and_modes(example):
    root = example[0]
    src, out = root / HF_DIR, root / OUT
    source, written = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    # The run trained on 32-token sequences; the model still has its 64 positions.
    assert written == source
    assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        p.name: 0o644 for p in out.iterdir()}
    assert not list(out.parent.glob(".*")), "temporary export directories were left behind"


def test_the_docs_python_snippet_generates_from_the_export(example, monkeypatch, capsys):
    root = example[0]
    (snippet,) = [b for b in _blocks("python") if "from_pretrained" in b]
    monkeypatch.chdir(root)
    exec(compile(snippet, str(DOC), "exec"), {})
    printed = capsys.readouterr().out
    assert "def fibonacci(n):" in printed, printed


def test_a_resumed_run_at_tp2_exports_the_checkpoint_not_the_hf_weights(example):
    """Resumed from the final checkpoint on two tensor-parallel ranks: the checkpoint wins over
    model.from_hf's weights, and the export gathers the TP shards back to exactly the same tensors."""
    root, train, _ = example
    again = [a.replace(OUT, "out/resumed") for a in train] + CI + [
        "checkpoint.dir=null", "checkpoint.load=runs/finetune_hf/ckpt", "log.dir=runs/resumed",
        "parallel.tensor=2", "--nproc", "2"]
    log = _ok(_run(again, root))
    assert "resumed from" in log and "nothing left to train" in log and "tensor 2" in log, log
    first, resumed, source = (read_safetensors_dir(root / d) for d in (OUT, "out/resumed", HF_DIR))
    assert sorted(first) == sorted(resumed)
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    assert not all(torch.equal(first[k], source[k]) for k in first)


def test_a_contradicting_override_is_one_line(example):
    root, train, _ = example
    result = _run(train + CI + ["model.hidden_size=64", "log.dir=runs/conflict"], root)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: model.hidden_size=64 contradicts model.from_hf="), \
        result.stderr
    assert "hidden_size=32" in lines[0]
