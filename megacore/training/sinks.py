"""Where metric records go: one small interface, three destinations.

A record is one flat dict per optimizer step (``{"step": 7, "loss": 3.2, ...}``) or per evaluation
(``{"step": 100, "eval_loss": ..., "eval_ppl": ...}``); ``MetricsLogger`` hands every record to every
sink of the run:

- ``JsonlSink``: ``<log.dir>/metrics.jsonl``, one JSON object per line, always on;
- ``TensorBoardSink``: event files in ``log.dir`` (``log.tensorboard=true``);
- ``WandbSink``: a Weights & Biases run (``log.wandb.project`` set), its files under ``log.dir``.

TensorBoard and W&B get the numeric fields only, as tags ``train/<field>`` and ``eval/<name>``
(``eval_loss`` becomes ``eval/loss``); booleans (``skipped``) become 0/1. They are optional
dependencies: ``require_sink_packages`` imports them when the run starts and turns a missing one
into a ``ConfigError`` that says what to install, before any model is built.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Protocol

from megacore.config import ConfigError


class MetricsSink(Protocol):
    """A destination of metric records. ``describe`` says where the records land (printed at the
    start and the end of a run)."""

    def write(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


def scalar_tags(record: dict) -> dict[str, float]:
    """The numeric fields of ``record`` as ``{tag: value}``: ``eval_x`` -> ``eval/x``, any other
    field ``f`` -> ``train/f``; ``step``, ``None`` and text (``skip_reason``) are left out."""
    tags = {}
    for key, value in record.items():
        if key == "step" or value is None or not isinstance(value, (bool, int, float)):
            continue
        tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
        tags[tag] = float(value)
    return tags


class JsonlSink:
    """``<log_dir>/metrics.jsonl``. A fresh run starts the file; a resumed run (``resume_step``)
    keeps the records up to that step and appends: a crashed run may have logged past its last
    checkpoint, and the file must read as one uninterrupted run."""

    def __init__(self, log_dir: str, resume_step: Optional[int] = None):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def write(self, step: int, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        return f"metrics {os.path.abspath(self.path)}"


def _truncate_after(path: str, step: int) -> None:
    """Drop the records of ``path`` after ``step`` (an atomic rewrite)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class TensorBoardSink:
    """Event files in ``log_dir`` (``tensorboard --logdir <log.dir>``)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir)

    def write(self, step: int, record: dict) -> None:
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def describe(self) -> str:
        return f"tensorboard {os.path.abspath(self.log_dir)}"


class WandbSink:
    """A Weights & Biases run: ``project``/``name``/``entity`` from ``log.wandb``, the resolved run
    config as its config, its local files under ``<log_dir>/wandb``. ``offline`` writes them without
    contacting the server (``wandb sync <dir>`` uploads them later). A resumed run is a new W&B run."""

    def __init__(self, log_dir: str, project: str, name: Optional[str] = None, entity: Optional[str] = None,
                 offline: bool = False, config: Optional[dict] = None):
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        try:
            self._run = wandb.init(project=project, name=name, entity=entity, dir=log_dir, config=config or {},
                                   mode="offline" if offline else "online")
        except Exception as e:  # a missing login, no network: one line, before the first step
            raise ConfigError(
                f"log.wandb.project={project!r}: Weights & Biases could not start the run ({type(e).__name__}: "
                f"{e}); run `wandb login`, or set log.wandb.offline=true to write the run under log.dir only"
            ) from None
        self.run_dir = os.path.dirname(self._run.dir)  # <log_dir>/wandb/<offline-run-...>; .dir is its files/

    def write(self, step: int, record: dict) -> None:
        # An eval record of step k lands in the row of the train record of step k (same step).
        self._run.log(scalar_tags(record), step=step)

    def close(self) -> None:
        if self._run is not None:
            # Closed while an exception propagates (the trainer's ``finally``): W&B marks the run failed.
            self._run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
            self._run = None

    def describe(self) -> str:
        return f"wandb {os.path.abspath(self.run_dir)}"


def require_sink_packages(log_cfg) -> None:
    """Import the optional packages that ``log`` asks for, or raise a ConfigError naming what to
    install (called when a run starts, on every rank, so a missing package fails before any work)."""
    wanted = []
    if log_cfg.tensorboard:
        wanted.append(("log.tensorboard", True, "tensorboard", "torch.utils.tensorboard", "log.tensorboard=false"))
    if log_cfg.wandb.project:
        wanted.append(("log.wandb.project", log_cfg.wandb.project, "wandb", "wandb", "log.wandb.project=null"))
    for key, value, package, module, off in wanted:
        try:
            __import__(module)
        except ImportError as e:
            raise ConfigError(f"{key}={value!r} needs the {package} package, which cannot be imported ({e}); "
                              f"pip install {package} (or pip install 'megacore[track]'), or set {off}") from None


def open_sinks(cfg, resume_step: Optional[int]) -> list:
    """The sinks of run config ``cfg`` (rank 0 only): JSONL always, then TensorBoard and W&B when asked."""
    log = cfg.log
    sinks: list = [JsonlSink(log.dir, resume_step)]
    try:
        if log.tensorboard:
            sinks.append(TensorBoardSink(log.dir))
        if log.wandb.project:
            w = log.wandb
            sinks.append(WandbSink(log.dir, w.project, w.name, w.entity, w.offline, config=cfg.to_dict()))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
