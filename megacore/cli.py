"""The ``megacore`` command: ``train``, ``config``, ``preprocess``, ``convert``, ``generate``, ``serve``.

usage:
    megacore train CONFIG.yaml [dotted.key=value ...] [--nproc N [--stop-grace-s S]]
    megacore config CONFIG.yaml [dotted.key=value ...] [--nproc N]
    megacore preprocess --input data.jsonl --output-prefix out/data --tokenizer bpe
    megacore convert --from hf --input HF_DIR --output CKPT_DIR   (and back: --from megacore)
    megacore generate --model HF_DIR_OR_CKPT --prompt "text"
    megacore serve --model HF_DIR_OR_CKPT [--host 127.0.0.1] [--port 8000]   (OpenAI-compatible HTTP)
    megacore --version

`megacore train --help` lists every config key with its type, default and meaning; each command
takes --help.
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__.split("\n", 2)[2]

TRAIN_USAGE = """\
usage: megacore train CONFIG.yaml [dotted.key=value ...] [--nproc N [--stop-grace-s S]]

Train the model CONFIG.yaml describes (examples: configs/*.yaml), with dotted.key=value overrides.
The run writes <log.dir>/metrics.jsonl and <log.dir>/config.yaml: the resolved config, headed by
the versions of megacore, torch and python and the GPU; `megacore train <log.dir>/config.yaml`
runs it again. A run that does not resume a checkpoint, in a log.dir that holds an earlier run,
writes to <log.dir>-2 (-3, ...) instead, and says so. `megacore config CONFIG.yaml [overrides]`
prints the resolved config without training.

  --nproc N          run N local processes (RANK/WORLD_SIZE as torchrun sets them; gloo on CPU,
                     NCCL on GPUs); torchrun -m megacore.train ... works too
  --stop-grace-s S   with --nproc: seconds the workers get to finish the step and save after
                     SIGTERM or Ctrl-C (default 600)
  -h, --help         this text and every config key

Exit status: 0 done (or stopped cleanly by a signal); 1 training failed on the way (the run
diverged, the data ran out of labelled tokens); 2 the run cannot start or go on as configured: a
bad config, an unreadable or mismatched checkpoint, unusable data (one line says what and how to
fix it); 3 this rank stopped because another rank failed (that rank says why).
"""

CONFIG_USAGE = """\
usage: megacore config CONFIG.yaml [dotted.key=value ...] [--nproc N]

Print the resolved config (the file, then the overrides; every key, validated, for a world of N
processes with --nproc) as YAML that `megacore train` reads back to the same run. Values a run
derives when it starts (model.vocab_size from the tokenizer) show as configured; the config.yaml a
run writes into its log.dir holds them as used.
"""

def _launch_local(nproc: int, args: list[str], stop_grace_s: float) -> int:
    """Run ``megacore.train`` on ``nproc`` local processes (``megacore.launcher``: stop grace, failure
    handling, no orphans)."""
    from megacore.launcher import launch_local

    return launch_local(nproc, args, stop_grace_s)


def _init_distributed(timeout_s: float) -> None:
    """Under torchrun or ``--nproc`` (WORLD_SIZE > 1): join the default process group (NCCL with CUDA,
    else gloo; MEGACORE_BACKEND=gloo forces gloo) with ``parallel.timeout_s`` as its collective timeout."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megacore.parallel.topology import init_default_group

        init_default_group("gloo" if os.environ.get("MEGACORE_BACKEND") == "gloo" else None, timeout_s)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _rank_prefix() -> str:
    return "" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else f"[rank {os.environ.get('RANK')}] "


def _report(line: str) -> None:
    """One line to stderr in ONE write: the ranks share the launcher's stderr, and print()'s separate
    write of the newline lets another rank's line land in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _help(usage: str) -> str:
    from megacore.config.help import render_keys

    return usage + "\n" + render_keys()


def _split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """``--nproc``/``--stop-grace-s`` (either spelling) and ``-h``/``--help`` apart from the rest."""
    opts, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--nproc", "--stop-grace-s"):
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {a} needs a number, e.g. {a} {2 if a == '--nproc' else 600}")
            opts[a] = argv[i + 1]
            i += 2
            continue
        if a.startswith(("--nproc=", "--stop-grace-s=")):
            name, value = a.split("=", 1)
            opts[name] = value
        elif a in ("-h", "--help"):
            opts["help"] = True
        else:
            rest.append(a)
        i += 1
    return opts, rest


def _nproc(opts: dict) -> int | None:
    nproc = opts.get("--nproc")
    if nproc is None:
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise SystemExit(f"error: --nproc {nproc!r} is not a positive integer")
    return int(nproc)


def _config_and_overrides(rest: list[str]) -> tuple[str | None, list[str]]:
    config_path = rest[0] if rest and "=" not in rest[0] else None
    return config_path, (rest[1:] if config_path else rest)


def _command_args(argv: list[str], usage: str, command: str):
    """``(opts, rest, nproc)`` of a config-taking command, or the exit code when there is nothing to
    run: help printed (0), a bad option, or no config and no override (2; a bare `megacore train`
    would train a default model nobody asked for)."""
    try:
        opts, rest = _split_args(argv)
        nproc = _nproc(opts)
    except SystemExit as e:
        _report(str(e))
        return 2
    if opts.get("help"):
        _print(_help(usage))
        return 0
    if not rest:
        _report(usage.splitlines()[0] + "\nerror: give a config file (e.g. configs/tiny_cpu.yaml) or key=value "
                f"overrides; `megacore {command} --help` lists the options and every config key")
        return 2
    return opts, rest, nproc


def run_train(argv: list[str]) -> int:
    parsed = _command_args(argv, TRAIN_USAGE, "train")
    if isinstance(parsed, int):
        return parsed
    opts, rest, nproc = parsed
    from megacore.checkpoint.errors import CheckpointError
    from megacore.config import ConfigError
    from megacore.launcher import DEFAULT_STOP_GRACE_S, exit_with_launcher
    from megacore.training.contract import TrainingError

    config_path, overrides = _config_and_overrides(rest)
    if nproc is not None and nproc > 1:
        stop_grace = opts.get("--stop-grace-s")
        try:
            grace = DEFAULT_STOP_GRACE_S if stop_grace is None else float(stop_grace)
        except ValueError:
            grace = -1.0
        if not grace >= 0 or grace == float("inf"):
            _report(f"error: --stop-grace-s {stop_grace!r} is not a number of seconds >= 0")
            return 2
        try:  # a config error is said once, here, instead of once per worker
            _resolved_config(config_path, overrides).validate(world_size=nproc)
        except ConfigError as e:
            _report(f"config error: {e}")
            return 2
        return _launch_local(nproc, rest, grace)
    exit_with_launcher()  # a worker of `--nproc`: stop when the launcher dies
    hang_dump_s = os.environ.get("MEGACORE_HANG_DUMP_S")
    if hang_dump_s:  # diagnosing a hang: every thread's Python stack to stderr after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(hang_dump_s), exit=False)
    from megacore.training.contract import PeerFailed

    try:
        cfg = _resolved_config(config_path, overrides)
        cfg.validate()  # before any key is used (timeout_s below)
        _init_distributed(cfg.parallel.timeout_s)
        from megacore.training.trainer import Trainer

        Trainer(cfg).run()
    except ConfigError as e:
        if _is_rank0():  # every rank validates the same config: say it once
            _report(f"config error: {e}")
        return 2
    except CheckpointError as e:  # a damaged, mismatched or unwritable checkpoint: the message names it
        _report(f"{_rank_prefix()}checkpoint error: {e}")
        return 2
    except TrainingError as e:
        _report(f"{_rank_prefix()}training stopped: {e}")
        return 1
    except PeerFailed:
        return 3
    except OSError as e:  # a missing input file, or the file system refused (log.dir not writable, disk full)
        what = f"cannot use {e.filename}: {e.strerror}; check the path and its permissions" if e.filename else e
        _report(f"{_rank_prefix()}error: {what}")
        return 2
    except ValueError as e:
        if not _raised_by_input_readers(e):
            raise
        _report(f"{_rank_prefix()}error: {e}")
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _raised_by_input_readers(e: BaseException) -> bool:
    """Whether ``e`` comes from the data or Hugging Face readers (``megacore.data``, ``megacore.interop``),
    whose ValueErrors describe a bad input file and name it; anywhere else a ValueError is a bug,
    and keeps its traceback."""
    tb, module = e.__traceback__, ""
    while tb is not None:
        module, tb = tb.tb_frame.f_globals.get("__name__", ""), tb.tb_next
    return module.startswith(("megacore.data", "megacore.interop"))


def _resolved_config(config_path, overrides):
    """The run config as ``megacore train`` runs it, not yet validated: YAML and overrides, then the
    model section from ``model.from_hf`` when set (its config.json decides the shape, so the layout
    checks must see it)."""
    from megacore.config import load_run_config

    cfg = load_run_config(config_path, overrides)
    if cfg.model.from_hf is not None:
        from megacore.training.hf_bridge import HFBridge

        HFBridge(cfg)
    return cfg


def run_config(argv: list[str]) -> int:
    """``megacore config CONFIG.yaml [overrides] [--nproc N]``: the resolved, validated config as YAML."""
    from megacore.config import ConfigError
    from megacore.config.loading import dump_run_config

    parsed = _command_args(argv, CONFIG_USAGE, "config")
    if isinstance(parsed, int):
        return parsed
    opts, rest, nproc = parsed
    config_path, overrides = _config_and_overrides(rest)
    try:
        cfg = _resolved_config(config_path, overrides).validate(world_size=nproc)
    except ConfigError as e:
        _report(f"config error: {e}")
        return 2
    _print(dump_run_config(cfg))
    return 0


def version_text() -> str:
    import platform

    import torch

    import megacore

    return f"megacore {megacore.__version__} (torch {torch.__version__}, python {platform.python_version()})"


def _print(text: str) -> None:
    """``text`` to stdout; a reader that stops early (``| head``) ends the output, not with a traceback."""
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _one_line_errors(command: str, run, argv: list[str]) -> int:
    """Run another command's ``main``; a library error it lets through (a bad config, checkpoint, data
    or Hugging Face directory) ends as one line with exit status 2, like ``megacore train``'s."""
    from megacore.checkpoint.errors import CheckpointError
    from megacore.config import ConfigError

    try:
        return run(argv)
    except (ConfigError, CheckpointError, OSError) as e:  # OSError: a file missing, unreadable or unwritable
        _report(f"error: megacore {command}: {e}")
        return 2
    except ValueError as e:
        if not _raised_by_input_readers(e):
            raise
        _report(f"error: megacore {command}: {e}")
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            _print(USAGE)
            return 0
        _report(USAGE)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("--version", "-V", "version"):
        _print(version_text())
        return 0
    if command == "train":
        return run_train(rest)
    if command == "config":
        return run_config(rest)
    if command == "preprocess":
        from megacore.data.preprocess import main as preprocess_main

        return _one_line_errors(command, preprocess_main, rest)
    if command == "convert":
        from megacore.checkpoint.convert import main as convert_main

        return _one_line_errors(command, convert_main, rest)
    if command == "generate":
        from megacore.inference.generate import main as generate_main

        return _one_line_errors(command, generate_main, rest)
    if command == "serve":
        from megacore.inference.server import main as serve_main

        return serve_main(rest)
    _report(f"error: unknown command {command!r}; use one of train, config, preprocess, convert, generate, serve, "
            f"--version\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
