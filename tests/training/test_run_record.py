"""Every run keeps its record (issue 21): ``<log.dir>/config.yaml`` holds the resolved config and the
versions, and reading it back gives the same ``RunConfig``, so ``megacore train <log.dir>/config.yaml``
repeats the run (the same losses, here on CPU); a second run that does not resume writes to a new
numbered directory instead of over the first one's ``metrics.jsonl``; a resumed run continues in its
own; every rank takes rank 0's choice."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from megacore.config import load_run_config
from megacore.training.run_dir import agree_run_dir, choose_run_dir, read_versions
from tests.dist.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128", "data.source=mock",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_iters=0", "train.eval_interval=0",
        "log.interval=100", "train.iters=4"]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "megacore", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _records(log_dir) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _body(path) -> list[str]:
    with open(path) as f:
        return [line for line in f if not line.startswith("#")]


def test_config_yaml_reproduces_the_run_and_a_second_run_gets_its_own_directory(tmp_path):
    import torch

    import megacore

    log = tmp_path / "run"
    overrides = [*TINY, f"log.dir={log}"]
    _cli(["train", CONFIG, *overrides])
    written = log / "config.yaml"
    # The record: what ran (versions, device) and the config, which loads back to the run's config.
    assert read_versions(written) == {"megacore": megacore.__version__, "torch": torch.__version__,
                                      "python": platform.python_version(), "device": "cpu"}
    assert load_run_config(str(written)).validate() == load_run_config(CONFIG, overrides).validate()
    first = (log / "metrics.jsonl").read_bytes()

    # The same file runs again: a used log.dir, so the run goes to <log.dir>-2, and says so.
    again = _cli(["train", str(written)])
    assert f"this run writes to {log}-2" in again.stdout
    assert (log / "metrics.jsonl").read_bytes() == first  # the first run's record is untouched
    losses = [r["loss"] for r in _records(log)]
    assert len(losses) == 4 and [r["loss"] for r in _records(f"{log}-2")] == losses  # the same run
    second = _body(f"{log}-2/config.yaml")
    assert second == [line.replace(f"dir: {log}", f"dir: {log}-2") for line in _body(written)]
    assert second != _body(written)


def test_the_next_free_number_is_chosen_and_other_files_do_not_count(tmp_path):
    base = tmp_path / "run"
    assert choose_run_dir(str(base), resuming=False) == str(base)  # nothing there yet
    base.mkdir()
    (base / "stdout").write_text("a launcher's log, not a run")
    assert choose_run_dir(str(base), resuming=False) == str(base)
    (base / "metrics.jsonl").write_text("")
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "config.yaml").write_text("")
    assert choose_run_dir(str(base), resuming=False) == f"{base}-3"
    assert choose_run_dir(str(base) + "/", resuming=False) == f"{base}-3"
    assert choose_run_dir(str(base), resuming=True) == str(base)


def test_a_resumed_run_continues_in_its_log_dir_and_keeps_the_earlier_config(tmp_path, capsys):
    from megacore.cli import main

    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    common = [*TINY, f"log.dir={log}", f"checkpoint.dir={ckpt}"]
    assert main(["train", CONFIG, *common, "train.iters=2"]) == 0
    assert main(["train", CONFIG, *common, "train.iters=4"]) == 0  # resumes at step 2
    assert "holds an earlier run" not in capsys.readouterr().out
    assert not os.path.exists(f"{log}-2")
    assert [r["step"] for r in _records(log)] == [1, 2, 3, 4]
    assert load_run_config(str(log / "config.yaml")).train.iters == 4
    assert load_run_config(str(log / "config.until-step-2.yaml")).train.iters == 2


def _agree(rank, world_size, root):
    # Each rank sees its own disk (its own working directory): only rank 0's holds an earlier run.
    os.chdir(os.path.join(root, f"node{rank}"))
    return agree_run_dir("runs/x", resuming=False, rank=rank, info=lambda msg: None)


def test_every_rank_takes_rank_0s_choice(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"node{rank}" / "runs" / "x").mkdir(parents=True)
    (tmp_path / "node0" / "runs" / "x" / "metrics.jsonl").write_text("")
    assert run_distributed(_agree, world_size=2, args=(str(tmp_path),)) == ["runs/x-2", "runs/x-2"]


@pytest.mark.parametrize("resuming", [False, True])
def test_one_process_needs_no_process_group(tmp_path, resuming):
    (tmp_path / "metrics.jsonl").write_text("")
    said = []
    got = agree_run_dir(str(tmp_path), resuming, 0, said.append)
    assert got == (str(tmp_path) if resuming else f"{tmp_path}-2")
    assert bool(said) is not resuming
