"""``megacore convert``: a user's mistake is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import pytest

from tests.interop.hf_reference import build_hf

from megacore.checkpoint.convert import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    build_hf("llama_gqa", seed=2).save_pretrained(root / "hf")
    assert main(["--from", "hf", "--input", str(root / "hf"), "--output", str(root / "ckpt")]) == 0
    (root / "a_file").write_text("x")
    return root


@pytest.mark.parametrize("args, message", [
    (["--from", "megacore", "--input", "{root}/nowhere", "--output", "{root}/o1"], "holds no checkpoint"),
    (["--from", "hf", "--input", "{root}/nowhere", "--output", "{root}/o2"], "config.json does not exist"),
    (["--from", "megacore", "--input", "{root}/ckpt", "--output", "{root}/o3", "--family", "bert"],
     "family='bert' is not supported"),
    (["--from", "megacore", "--input", "{root}/ckpt", "--output", "{root}/a_file"], "is not a directory"),
    (["--from", "hf", "--input", "{root}/hf", "--output", "{root}/ckpt"], "already holds checkpoints"),
    (["--from", "megacore", "--input", "{root}/hf", "--output", "{root}/o4"], "holds no checkpoint"),
], ids=["no-checkpoint", "no-hf-dir", "unknown-family", "output-is-a-file", "output-has-checkpoints", "hf-as-ckpt"])
def test_errors_are_one_line(dirs, capsys, args, message):
    assert main([a.format(root=dirs) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
