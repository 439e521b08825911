"""The run directory (``log.dir``): one run's record, never overwritten by the next run.

A run that starts from step 0 in a ``log.dir`` that already holds a run (its ``metrics.jsonl`` or
``config.yaml``) writes to the first unused ``<log.dir>-2``, ``<log.dir>-3``, ... instead, and says
so; a run that resumes a checkpoint at step > 0 continues in ``log.dir`` (the trainer trims the
metrics past the checkpoint). Rank 0 decides, every rank takes its answer, and rank 0 then claims
the directory by writing ``config.yaml``: the resolved config as ``megacore train`` reads it back
(so ``megacore train <log.dir>/config.yaml`` runs the same configuration again), under a comment
header with the versions of megacore, torch and python, the device and the world size.

On a resume whose config differs from the one recorded, the earlier file is kept as
``config.until-step-<N>.yaml`` (the config that trained the steps up to the checkpoint at ``N``).
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Callable, Optional

from megacore.config import RunConfig
from megacore.config.loading import dump_run_config

RUN_FILES = ("metrics.jsonl", "config.yaml")  # a directory holding one of these holds a run


def holds_a_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_FILES)


def choose_run_dir(log_dir: str, resuming: bool) -> str:
    """``log_dir``, or when that holds an earlier run and this one does not resume, the first
    ``<log_dir>-<n>`` (n = 2, 3, ...) that holds none."""
    base = log_dir.rstrip("/\\") or log_dir
    if resuming or not holds_a_run(base):
        return log_dir
    n = 2
    while holds_a_run(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def agree_run_dir(log_dir: str, resuming: bool, rank: int, info: Callable[[str], None]) -> str:
    """:func:`choose_run_dir` decided on rank 0 and taken by every rank (collective when the
    default process group is up), before any rank writes into it."""
    from megacore.checkpoint import comm

    chosen = choose_run_dir(log_dir, resuming) if rank == 0 else None
    chosen = comm.broadcast_object(chosen, src=0)
    if chosen != log_dir:
        info(f"log.dir {log_dir} holds an earlier run (its metrics.jsonl / config.yaml): this run writes to "
             f"{chosen} (resume a checkpoint to continue a run in its own log.dir)")
    return chosen


def versions(device_name: str) -> dict:
    """What ran the run: package versions, the device (the GPU's name, or "cpu")."""
    import torch

    import megacore

    return {"megacore": megacore.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": device_name}


def write_run_config(cfg: RunConfig, device_name: str, world_size: int, step: int) -> str:
    """Write ``<cfg.log.dir>/config.yaml`` (rank 0 only; see the module doc); returns its path."""
    os.makedirs(cfg.log.dir, exist_ok=True)
    path = os.path.join(cfg.log.dir, "config.yaml")
    v = versions(device_name)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = (f"The resolved config of a megacore run (started {now} at step {step}, world size {world_size});\n"
              f"`megacore train {path}` runs it again.\n" + " | ".join(f"{k} {val}" for k, val in v.items()))
    text = dump_run_config(cfg, header)
    _keep_earlier(path, text, step)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _body(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def _keep_earlier(path: str, text: str, step: int) -> None:
    """On a resume: keep a recorded config that differs from this run's as config.until-step-<step>.yaml."""
    if step == 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = f.read()
    if _body(old) != _body(text):
        os.replace(path, os.path.join(os.path.dirname(path), f"config.until-step-{step}.yaml"))


def read_versions(path: str) -> Optional[dict]:
    """The versions line of a ``config.yaml`` written by :func:`write_run_config`, as a dict."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# megacore "):
                parts = [p.strip().split(" ", 1) for p in line[2:].split("|")]
                return {k: v for k, v in parts}
    return None
