"""``megacore train`` turns every user error into one line on stderr that names the file or key and
the fix, with exit status 2 and no traceback: bad config values and files, and every checkpoint
the run cannot resume from (``CheckpointError``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from megacore.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128", "data.source=mock",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_iters=0", "train.eval_interval=0",
        "log.interval=100"]


def _train(args: list[str], capsys) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err


def _one_line(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("override,words", [
    ("precision.dtype=fp64", ["precision.dtype='fp64'", "bf16"]),
    ("train.lr=-1", ["train.lr=-1.0", "must be positive"]),
    ("train.lr=nan", ["train.lr=nan", "finite"]),
    ("train.clip_grad=inf", ["train.clip_grad=inf", "finite"]),
    ("model.init_std=nan", ["model.init_std=nan", "finite"]),
    ("model.norm_epsilon=inf", ["model.norm_epsilon=inf", "finite"]),
    ("data.split=969,nan,1", ["data.split=", "finite"]),
    ("train.eval_iters=-2", ["train.eval_iters=-2"]),
    ("train.eval_interval=-1", ["train.eval_interval=-1"]),
    ("train.adam_beta1=1.5", ["train.adam_beta1=1.5", "[0, 1)"]),
    ("train.adam_beta2=-0.1", ["train.adam_beta2=-0.1", "[0, 1)"]),
])
def test_bad_config_values_are_one_line_with_exit_2(tmp_path, capsys, override, words):
    code, err = _train([CONFIG, *TINY, f"log.dir={tmp_path}", override], capsys)
    assert code == 2
    _one_line(err, "config error:", *words)


def test_unusable_config_files_are_named(tmp_path, capsys):
    code, err = _train([str(tmp_path)], capsys)
    assert code == 2
    _one_line(err, str(tmp_path), "is a directory")
    latin1 = tmp_path / "run.yaml"
    latin1.write_bytes("log:\n  dir: r\xe9sum\xe9\n".encode("latin-1"))
    code, err = _train([str(latin1)], capsys)
    assert code == 2
    _one_line(err, str(latin1), "not UTF-8")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step run's checkpoint directory (written in this process through the CLI)."""
    root = tmp_path_factory.mktemp("ckpt")
    code = main(["train", CONFIG, *TINY, "train.iters=2", f"log.dir={root / 'log'}", f"checkpoint.dir={root / 'ckpt'}"])
    assert code == 0
    return root / "ckpt"


def _damaged(checkpoint, tmp_path, damage):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    damage(copy / "iter_0000002")
    return copy


def _truncate(d):
    shard = next(d.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])


def _flip(d):
    shard = next(d.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage,extra,words", [
    ("truncated", _truncate, [], ["truncated"]),
    ("flipped", _flip, [], ["corrupted"]),
    ("no_index", lambda d: (d / "index.json").unlink(), [], ["iter_0000002"]),
    ("other_model", lambda d: None, ["model.hidden_size=64"], ["hidden_size"]),
])
def test_checkpoint_errors_are_one_line_with_exit_2(checkpoint, tmp_path, capsys, name, damage, extra, words):
    ckpt = _damaged(checkpoint, tmp_path, damage)
    code, err = _train([CONFIG, *TINY, "train.iters=4", f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={ckpt}", *extra],
                       capsys)
    assert code == 2
    _one_line(err, "checkpoint error:", *words)


def test_checkpoint_error_in_a_real_process_has_no_traceback(checkpoint, tmp_path):
    ckpt = _damaged(checkpoint, tmp_path, _truncate)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "megacore", "train", CONFIG, *TINY, "train.iters=4",
                          f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={ckpt}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    _one_line(out.stderr, "checkpoint error:", "rank_00000.safetensors", "truncated")
