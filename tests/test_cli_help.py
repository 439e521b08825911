"""The self-documenting command line (issue 21): every config key of every section is documented
beside its field and listed by ``megacore train --help`` with its type and default; ``megacore
config`` prints a resolved config that loads back to the same ``RunConfig``; ``--version``; a bare
``megacore train`` prints the usage; retired keys say where they went; every command's input error
is one line with exit status 2.

The expected listing is computed here from the dataclasses with this file's own walk and formatting
rules, not with ``megacore.config.help``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import yaml

from megacore.config import ConfigError, RunConfig, load_run_config
from megacore.config.loading import dump_run_config, from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _leaves(cls, prefix=""):
    """(dotted key, field, type) of every non-section field, and the sections, walked here."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield prefix + f.name, f, None
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, tp


def _expected_type(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_expected_type(inner)} or null"
    return {int: "int", float: "float", str: "str", bool: "bool", list: "list"}[tp]


def _expected_default(f) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _cli(args: list[str], cwd: str = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "megacore", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _listing(text: str) -> dict:
    """``{key: (type, default, doc)}`` parsed from the help text: a key line ``  key: type = default``
    followed by its doc lines, indented deeper."""
    out, key = {}, None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and ": " in line and " = " in line:
            key, rest = line.strip().split(": ", 1)
            tp, default = rest.split(" = ", 1)
            out[key] = [tp, default, ""]
        elif line.startswith("      ") and key is not None:
            out[key][2] = (out[key][2] + " " + line.strip()).strip()
        else:
            key = None
    return out


# ------------------------------------------------------------------------------------- documentation

def test_every_field_of_every_section_has_a_doc():
    keys = list(_leaves(RunConfig))
    assert len(keys) > 150 and "log.wandb.project" in [k for k, _, _ in keys]
    missing = [k for k, f, _ in keys if len(f.metadata.get("doc", "").strip()) < 8]
    assert not missing, f"fields without a doc: {missing}"


@pytest.mark.parametrize("command", ["train", "config"])
def test_help_lists_every_key_with_type_default_and_doc(command):
    out = _cli([command, "--help"])
    assert out.returncode == 0, out.stderr
    assert f"usage: megacore {command}" in out.stdout
    listed = _listing(out.stdout)
    want = {k: (_expected_type(tp), _expected_default(f), " ".join(f.metadata["doc"].split()))
            for k, f, tp in _leaves(RunConfig) if tp is not None}
    assert set(listed) == set(want), (set(want) - set(listed), set(listed) - set(want))
    for key, (tp, default, doc) in want.items():
        assert tuple(listed[key]) == (tp, default, doc), key
    for section in ("model", "parallel", "train", "data", "checkpoint", "precision", "recompute", "log", "log.wandb",
                    "vision", "profile"):
        assert f"\n{section}: " in out.stdout, section


def test_version_names_megacore_and_torch():
    import torch

    import megacore

    out = _cli(["--version"])
    assert out.returncode == 0, out.stderr
    assert f"megacore {megacore.__version__}" in out.stdout and f"torch {torch.__version__}" in out.stdout


def test_bare_train_prints_the_usage_and_trains_nothing(tmp_path):
    out = _cli(["train"], cwd=str(tmp_path))
    assert out.returncode == 2
    assert "usage: megacore train CONFIG.yaml" in out.stderr and "--help" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert os.listdir(tmp_path) == []  # no runs/ directory: no default model was trained


# ----------------------------------------------------------------------------------- resolved config

def _every_field_set(cls, salt: int = 0):
    """An instance of ``cls`` whose every field differs from its default, with strings YAML would
    read as something else if written bare (not validated: this is about writing and reading)."""
    tricky = ["off", "true", "1.5", "969,30,1", "a: b", "x # y", "[1, 2]", "~x", "0x10"]
    hints, kwargs = typing.get_type_hints(cls), {}
    for i, f in enumerate(dataclasses.fields(cls)):
        tp, n = hints[f.name], i + salt
        optional = typing.get_origin(tp) is typing.Union
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
        if dataclasses.is_dataclass(base):
            kwargs[f.name] = _every_field_set(base, n)
        elif optional and n % 3 == 0 and (f.default is not None):
            kwargs[f.name] = None
        elif base is bool:
            kwargs[f.name] = not f.default
        elif base is int:
            kwargs[f.name] = 1000 + n
        elif base is float:
            kwargs[f.name] = [1e-8, 0.125, 3e10, -2.5][n % 4] + (0 if n % 4 else n * 1e-10)
        elif base is str:
            kwargs[f.name] = tricky[n % len(tricky)]
        else:
            kwargs[f.name] = ["a", 1, 2.5, "off"]
    return cls(**kwargs)


def test_dumped_config_loads_back_equal_for_every_key():
    cfg = _every_field_set(RunConfig)
    text = dump_run_config(cfg, "a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    back = from_dict(RunConfig, yaml.safe_load(text))
    assert back == cfg
    assert back != RunConfig()


def test_config_command_prints_the_resolved_config_that_train_reads_back(tmp_path):
    overrides = ["train.iters=7", "train.adam_eps=1e-7", "parallel.tp_comm_overlap=off", "recompute.granularity=full",
                 "data.split=90,9,1", "log.wandb.project=demo", f"log.dir={tmp_path / 'run'}"]
    out = _cli(["config", CONFIG, *overrides])
    assert out.returncode == 0, out.stderr
    path = tmp_path / "resolved.yaml"
    path.write_text(out.stdout)
    want = load_run_config(CONFIG, overrides).validate()
    assert load_run_config(str(path)).validate() == want
    assert yaml.safe_load(out.stdout)["log"]["wandb"]["project"] == "demo"


# ------------------------------------------------------------------------------------ errors, one line

def _one_line(out: subprocess.CompletedProcess, *words: str) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("key,points_to", [("train.log_interval=5", "log.interval"),
                                           ("data.num_workers=2", "remove it"),
                                           ("train.dtype=bf16", "precision.dtype")])
def test_retired_and_misplaced_keys_say_where_to_go(key, points_to):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_run_config(CONFIG, [key])
    assert points_to in str(info.value)
    name, value = key.split("=")
    section, leaf = name.split(".")
    with pytest.raises(ConfigError, match=points_to):  # in a YAML file too
        from_dict(RunConfig, {section: {leaf: value}})


def test_no_config_in_the_repository_sets_a_retired_key():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            load_run_config(os.path.join(ROOT, "configs", name))  # raises on an unknown key


@pytest.mark.parametrize("args,words", [
    (["train", CONFIG, "train.log_interval=5"], ["config error:", "train.log_interval", "log.interval"]),
    (["train", CONFIG, "train.itres=5", "--nproc", "2"], ["config error:", "train.itres", "iters"]),
    (["train", CONFIG, "parallel.tensor=3", "--nproc", "2"], ["config error:", "world size 2", "tensor=3"]),
    (["config", CONFIG, "train.lr=-1"], ["config error:", "train.lr=-1.0"]),
    (["config", CONFIG, "--nproc", "2", "parallel.tensor=4"], ["config error:", "world size 2", "tensor=4"]),
    (["convert", "--from", "hf", "--input", "/nonexistent/hf", "--output", "/nonexistent/out"], ["/nonexistent/hf"]),
    (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], ["/nonexistent/model"]),
])
def test_each_command_reports_a_bad_input_in_one_line_with_exit_2(args, words):
    _one_line(_cli(args), *words)


def test_preprocess_reports_a_missing_input_in_one_line(tmp_path):
    out = _cli(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                "--tokenizer", "bpe"])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "missing.jsonl" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_data_or_hf_reader_error_in_train_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """A ValueError raised by the Hugging Face / data readers names the bad file: one line, exit 2.
    A ValueError from anywhere else is a bug and propagates with its traceback."""
    from megacore.cli import main
    from megacore.interop import hf_io
    from megacore.training import trainer

    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    monkeypatch.setattr(trainer.Trainer, "run", lambda self: hf_io.read_json_file(bad))
    args = ["train", CONFIG, "data.source=mock", f"log.dir={tmp_path / 'log'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "not valid JSON" in err, err

    def bug(self):
        raise ValueError("an internal bug")

    monkeypatch.setattr(trainer.Trainer, "run", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(args)


def test_an_unusable_log_dir_is_one_line(tmp_path, capsys):
    from megacore.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    tiny = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.vocab_size=128",
            "model.seq_length=16", "data.source=mock", "train.global_batch_size=2", "train.micro_batch_size=2",
            "train.iters=1", "train.eval_interval=0"]
    assert main(["train", CONFIG, *tiny, f"log.dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(blocker / "run") in err and "Traceback" not in err, err
