"""``megacore generate`` and the model's maximum positions: a prompt longer than the model reads is
refused, a continuation that would run past it is warned about (and still generated)."""

from __future__ import annotations

import pytest
import torch

from megacore.config import TransformerConfig
from megacore.interop import hf
from megacore.models import GPTModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gen") / "llama"
    hf.save_pretrained(GPTModel(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64,
                                                  seq_length=16)), out)
    return out


def _ids(n: int) -> str:
    return ",".join(str(3 + i % 50) for i in range(n))


def test_prompt_longer_than_the_model_reads_is_refused(model_dir, capsys):
    from megacore.inference.generate import main

    assert main(["--model", str(model_dir), "--prompt-ids", _ids(17), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "the prompt has 17 tokens but the model reads at most 16 positions" in err and err.count("\n") == 1


def test_running_past_the_maximum_positions_warns_and_generates(model_dir, capsys):
    from megacore.inference.generate import main

    assert main(["--model", str(model_dir), "--prompt-ids", _ids(10), "--max-new-tokens", "6", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # 10 + 6 = 16 positions: inside
    assert len(captured.out.split()) == 16
    assert main(["--model", str(model_dir), "--prompt-ids", _ids(10), "--max-new-tokens", "9", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert "warning: the prompt (10 tokens) + --max-new-tokens 9 runs past the model's maximum of 16" in captured.err
    assert "--max-new-tokens to 6" in captured.err
    assert len(captured.out.split()) == 19
