"""Experiment tracking and profiling: the metric sinks (``metrics.jsonl``, TensorBoard, Weights &
Biases offline) record the same numbers, the ETA comes from recent steps, the profiler writes a
Chrome trace per rank over the requested steps, and missing optional packages or a memory snapshot
without CUDA stop the run at the start with one clear message.

Reference for every sink: ``metrics.jsonl`` of the same run (its format is checked by
``test_train_cli.py``). W&B never contacts the network: offline mode, with every W&B directory
under the test's tmp dir."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import pytest
import torch

from megacore.config import ConfigError, load_run_config
from megacore.training.metrics import EtaEstimator, MetricsLogger

from tests.training.test_train_cli import ROOT, _env, read_metrics, run_cli

# A 2-layer model on mock data: a step takes milliseconds on CPU.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=128", "model.seq_length=64", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.warmup_iters=2", "train.lr=3e-3", "log.interval=1",
         "data.source=mock", "model.vocab_size=256", "train.eval_iters=1"]


def _wandb_env(tmp_path) -> dict:
    """W&B offline and silent, with its config/cache/data directories inside ``tmp_path``."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_cfg"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}


def _cfg(tmp_path, extra):
    return load_run_config(os.path.join(ROOT, "configs/tiny_cpu.yaml"),
                           [*SMALL, f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={tmp_path / 'ckpt'}", *extra])


def _trainer(tmp_path, extra):
    from megacore.training.trainer import Trainer

    return Trainer(_cfg(tmp_path, extra))


# ----------------------------------------------------------------------------------------- readers
def _tensorboard_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _wandb_records(run_file: str) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then 32 KiB
    blocks of chunks, each ``crc32 (4) | length (2, little-endian) | type (1)`` + data; type 1 is a
    whole record, 2/3/4 its first/middle/last piece; a block tail shorter than a chunk header is
    padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(run_file, "rb").read()
    assert raw[:4] == b":W&B", raw[:8]
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def _wandb_history_and_config(log_dir: str) -> tuple[dict[int, dict], dict]:
    """``{step: {tag: value}}`` (rows logged at the same step merged) and the run's config (plus
    ``_exit_code``: the exit code the run finished with, None if it did not finish)."""
    runs = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    history, config = {}, {"_exit_code": None}
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # A key comes as ``key`` or as ``nested_key`` (its path), depending on the writer.
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "exit":
            config["_exit_code"] = record.exit.exit_code
    return history, config


def _trace_steps(path: str) -> tuple[int, set]:
    """(number of events, the step numbers of the ``megacore/step_<n>`` labels) of a Chrome trace."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    steps = {int(e["name"].rsplit("_", 1)[1]) for e in events if e.get("name", "").startswith("megacore/step_")}
    return len(events), steps


# ----------------------------------------------------------------------------------------- tests
def test_sinks_agree_and_each_rank_writes_its_trace(tmp_path):
    """Two ranks (DP 2) through ``megacore train --nproc 2`` with TensorBoard, W&B offline and the
    profiler over steps 2-3: TensorBoard and W&B hold the numbers of ``metrics.jsonl`` (train and
    eval), the W&B run files lie under log.dir with the resolved config, each rank writes a Chrome
    trace labelled with exactly steps 2 and 3, and the output paths are printed at start and end."""
    log_dir = tmp_path / "log"
    args = ["train", "configs/tiny_cpu.yaml", *SMALL, "train.iters=5", "train.eval_interval=3", f"log.dir={log_dir}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "log.tensorboard=true", "log.wandb.project=megacore-test",
            "log.wandb.name=tracking", "log.wandb.offline=true", "profile.start_step=2", "profile.end_step=3",
            "--nproc", "2"]
    out = run_cli(args, {**_env(str(tmp_path / "cache")), **_wandb_env(tmp_path)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    records = read_metrics(log_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and [r["step"] for r in evals] == [3]

    tb = _tensorboard_scalars(str(log_dir))
    wb, wb_config = _wandb_history_and_config(str(log_dir))
    for r in train:
        for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "consumed_samples", "skipped"):
            assert tb[f"train/{key}"][r["step"]] == pytest.approx(float(r[key]), rel=1e-6), key  # float32 events
            assert wb[r["step"]][f"train/{key}"] == pytest.approx(float(r[key]), rel=1e-12), key
    assert "train/skip_reason" not in tb and "train/step" not in tb
    for r in evals:
        for key in ("eval_loss", "eval_ppl"):
            tag = "eval/" + key[len("eval_"):]
            assert tb[tag][r["step"]] == pytest.approx(r[key], rel=1e-6)
            assert wb[r["step"]][tag] == pytest.approx(r[key], rel=1e-12)
    assert wb_config["train"]["iters"] == 5 and wb_config["log"]["wandb"]["name"] == "tracking"
    assert wb_config["profile"]["start_step"] == 2 and wb_config["_exit_code"] == 0

    for rank in (0, 1):
        trace = log_dir / "profile" / f"trace_rank{rank}_steps2-3.json"
        n_events, steps = _trace_steps(str(trace))
        assert n_events > 100 and steps == {2, 3}, (rank, n_events, steps)
    assert sorted(os.listdir(log_dir / "profile")) == ["trace_rank0_steps2-3.json", "trace_rank1_steps2-3.json"]

    outputs = [line for line in out.stdout.splitlines() if line.startswith("[megacore] outputs:")]
    assert len(outputs) == 2 and outputs[0] == outputs[1], out.stdout
    for part in (f"metrics {log_dir / 'metrics.jsonl'}", f"tensorboard {log_dir}", f"wandb {log_dir / 'wandb'}",
                 f"checkpoints {tmp_path / 'ckpt'}", f"profiler {log_dir / 'profile'}"):
        assert part in outputs[0], (part, outputs[0])


def test_profiler_writes_the_steps_it_covered_when_the_run_ends_early(tmp_path, capsys):
    """profile.end_step past train.iters: the trace of the steps run (2-3) is written at the end,
    and the run says so; a rank left out of profile.ranks writes nothing."""
    _trainer(tmp_path / "a", ["train.iters=3", "train.eval_interval=0", "profile.start_step=2",
                              "profile.end_step=10"]).run()
    trace = tmp_path / "a" / "log" / "profile" / "trace_rank0_steps2-3.json"
    n_events, steps = _trace_steps(str(trace))
    assert n_events > 100 and steps == {2, 3}
    assert "the run ended before profile.end_step=10" in capsys.readouterr().out

    _trainer(tmp_path / "b", ["train.iters=3", "train.eval_interval=0", "profile.start_step=2",
                              "profile.ranks=[1]"]).run()
    assert not os.path.exists(tmp_path / "b" / "log" / "profile")


@pytest.mark.parametrize("module,key,package", [("wandb", "log.wandb.project=p", "wandb"),
                                                ("torch.utils.tensorboard", "log.tensorboard=true", "tensorboard")])
def test_a_missing_tracking_package_stops_the_run_at_the_start(tmp_path, monkeypatch, module, key, package):
    """The package cannot be imported (``sys.modules[name] = None`` makes ``import`` raise): the run
    fails before it builds anything, with a ConfigError naming the key and the pip command."""
    monkeypatch.setitem(sys.modules, module, None)
    t = _trainer(tmp_path, ["train.iters=2", key, "log.wandb.offline=true"])
    with pytest.raises(ConfigError) as e:
        t.run()
    assert f"pip install {package}" in str(e.value) and key.split("=")[0] in str(e.value)
    assert not hasattr(t, "chunks") and not os.path.exists(tmp_path / "log" / "metrics.jsonl")


def test_wandb_that_cannot_start_is_a_config_error(tmp_path, monkeypatch):
    """wandb.init failing (no login, no network) is one ConfigError that says how to fix it; the
    JSONL sink opened before it is closed."""
    import wandb

    from megacore.training import sinks

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    opened = []
    real_jsonl = sinks.JsonlSink
    monkeypatch.setattr(sinks, "JsonlSink", lambda *a: opened.append(real_jsonl(*a)) or opened[-1])
    with pytest.raises(ConfigError, match="wandb login.*log.wandb.offline=true"):
        sinks.open_sinks(_cfg(tmp_path, ["log.wandb.project=p"]), None)
    assert opened and opened[0]._file is None


def test_wandb_run_closed_by_a_failing_run_is_marked_failed(tmp_path, monkeypatch):
    """The trainer closes its sinks in a ``finally``: while an error propagates, the W&B run
    finishes with exit code 1 (its records so far kept)."""
    from megacore.training.sinks import WandbSink

    for key, value in _wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    sink = WandbSink(str(tmp_path / "log"), "p", offline=True, config={"train": {"iters": 2}})
    with pytest.raises(KeyboardInterrupt):
        try:
            sink.write(1, {"step": 1, "loss": 2.5, "skip_reason": "text is left out"})
            raise KeyboardInterrupt
        finally:
            sink.close()
    history, config = _wandb_history_and_config(str(tmp_path / "log"))
    assert history[1]["train/loss"] == 2.5 and "train/skip_reason" not in history[1]
    assert config["train"] == {"iters": 2} and config["_exit_code"] == 1


def test_memory_snapshot_without_cuda_is_a_config_error(tmp_path):
    t = _trainer(tmp_path, ["train.iters=2", "profile.memory_snapshot=true", "device=cpu"])
    with pytest.raises(ConfigError, match="profile.memory_snapshot=True records CUDA .* device is cpu; set profile.memory_snapshot=false"):
        t.run()
    assert not hasattr(t, "chunks")


def test_eta_is_the_mean_of_recent_steps_after_the_warmup():
    """Hand computation: warm-up 2, window 3; step times 90, 40 (warm-up, left out), then 1, 2, 3, 4
    -> the mean of the last three, (2 + 3 + 4) / 3 = 3 s per step."""
    eta = EtaEstimator(window=3, warmup=2)
    for t in (90.0, 40.0):
        eta.observe(t)
        assert eta.seconds_left(10) is None  # only warm-up steps seen: unknown, not 90 s x 10
    for t in (1.0, 2.0, 3.0, 4.0):
        eta.observe(t)
    assert eta.seconds_left(10) == pytest.approx(30.0)
    assert eta.seconds_left(0) == 0.0
    eta.reset()  # a resume: a new warm-up
    eta.observe(5.0)
    assert eta.seconds_left(10) is None


def test_console_eta_ignores_the_slow_first_steps():
    """The issue's case: a 60 s first step (compilation) then 0.25 s steps, 100 steps in all. At
    step 10 the line says 90 steps x 0.25 s = 0:22, where the mean since step 1 said 9:04."""
    import io

    logger = MetricsLogger([], total_iters=100, stream=io.StringIO())
    for step in range(1, 11):
        logger.log_step({"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0,
                         "step_time_s": 60.0 if step == 1 else 0.25}, print_line=False)
    line = logger.console_line({"step": 10, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0})
    assert line.endswith("eta 0:22"), line


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_trace_and_memory_snapshot_at_the_end_and_on_oom(tmp_path):
    """On CUDA: the trace holds GPU kernels of the profiled steps, the memory snapshot is written at
    the end, and a run that runs out of memory writes ``..._oom.pickle`` and raises the OOM."""
    extra = ["device=cuda", "precision.dtype=bf16", "train.eval_interval=0", "profile.start_step=2",
             "profile.end_step=3", "profile.memory_snapshot=true", "profile.memory_snapshot_max_entries=20000"]
    _trainer(tmp_path / "a", ["train.iters=4", *extra]).run()
    profile = tmp_path / "a" / "log" / "profile"
    with open(profile / "trace_rank0_steps2-3.json") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    assert {int(e["name"].rsplit("_", 1)[1]) for e in events
            if e.get("name", "").startswith("megacore/step_")} == {2, 3}
    assert os.path.getsize(profile / "memory_snapshot_rank0.pickle") > 0

    t = _trainer(tmp_path / "b", ["train.iters=4", *extra])
    real = t.train_step

    def oom_at_step_2(step):
        if step == 1:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
        return real(step)

    t.train_step = oom_at_step_2
    with pytest.raises(torch.cuda.OutOfMemoryError):
        t.run()
    names = os.listdir(tmp_path / "b" / "log" / "profile")
    assert "memory_snapshot_rank0_oom.pickle" in names and "memory_snapshot_rank0.pickle" not in names
