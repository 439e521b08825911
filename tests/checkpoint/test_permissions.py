"""Outputs get the modes a plain ``open``/``mkdir`` gives under the umask (0644 / 0755 with 022),
never the 0600 of a temporary file renamed into place: checkpoints (the save, the lock, ``latest``)
and ``megacore preprocess`` output (.bin, .idx, the tokenizer, the meta sidecar) alike."""

import json
import os
import stat

import pytest

from megacore.checkpoint import CheckpointManager
from megacore.config import CheckpointConfig
from megacore.models.gpt import GPTModel
from tests.checkpoint.layouts import tiny_config


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root):
    """{relative path: permission bits} of everything under ``root``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def _expect(root, umask):
    for rel, mode in _modes(root).items():
        want = (0o777 if os.path.isdir(os.path.join(root, rel)) else 0o666) & ~umask
        assert mode == want, (rel, oct(mode), oct(want))


def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    root = tmp_path / "ckpt"
    model = GPTModel(tiny_config(num_layers=1), seed=0)
    manager = CheckpointManager(CheckpointConfig(dir=str(root), interval=1).validate())
    manager.save(1, model)
    manager.finish(2, model)  # a second, final save: latest replaced, the lock released
    names = set(_modes(root))
    assert {"latest", "iter_0000002", os.path.join("iter_0000002", "index.json"),
            os.path.join("iter_0000002", "rank_00000.safetensors")} <= names
    _expect(root, umask)


def test_preprocess_output_follows_the_umask(tmp_path, umask, monkeypatch):
    from megacore.data.preprocess import main

    monkeypatch.setenv("MEGACORE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} with some words"}) + "\n" for i in range(20)))
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "out" / "sub" / "docs"), "--tokenizer", "bpe",
                 "--vocab-size", "280"]) == 0
    assert sorted(_modes(tmp_path / "out" / "sub")) == ["docs.bin", "docs.idx", "docs.meta.json", "docs.tokenizer.json"]
    _expect(tmp_path / "out", umask)
    _expect(tmp_path / "cache", umask)  # the cached tokenizer too
