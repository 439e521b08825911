"""The ``megacore`` command: ``train``, ``preprocess``, ``convert``, ``generate``.

    megacore train CONFIG.yaml [dotted.key=value ...] [--nproc N [--stop-grace-s S]]
    megacore preprocess --input data.jsonl --output-prefix out/data --tokenizer bpe
    megacore convert --from hf --input HF_DIR --output CKPT_DIR   (and back: --from megacore)
    megacore generate --model HF_DIR_OR_CKPT --prompt "text"
    megacore serve --model HF_DIR_OR_CKPT [--host 127.0.0.1] [--port 8000]   (OpenAI-compatible HTTP)

Exit status of ``megacore train``: 0 done (or stopped cleanly by a signal); 1 training failed on the
way (the run diverged, the data ran out of labelled tokens); 2 the run cannot start or go on as
configured: a bad config, an unreadable or mismatched checkpoint, unusable data (one line says what
and how to fix it); 3 this rank stopped because another rank failed (that rank says why).
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


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


def run_train(argv: list[str]) -> int:
    from megacore.checkpoint.errors import CheckpointError
    from megacore.config import ConfigError, load_run_config
    from megacore.launcher import DEFAULT_STOP_GRACE_S, exit_with_launcher
    from megacore.training.contract import TrainingError

    nproc = None
    stop_grace = None
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--nproc", "--stop-grace-s"):
            if i + 1 >= len(argv):
                print(f"error: {a} needs a number, e.g. {a} {2 if a == '--nproc' else 600}", file=sys.stderr)
                return 2
            if a == "--nproc":
                nproc = argv[i + 1]
            else:
                stop_grace = argv[i + 1]
            i += 2
            continue
        if a.startswith("--nproc="):
            nproc = a.split("=", 1)[1]
        elif a.startswith("--stop-grace-s="):
            stop_grace = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            rest.append(a)
        i += 1
    if nproc is not None:
        if not nproc.isdigit() or int(nproc) < 1:
            print(f"error: --nproc {nproc!r} is not a positive integer", file=sys.stderr)
            return 2
        if int(nproc) > 1:
            try:
                grace = DEFAULT_STOP_GRACE_S if stop_grace is None else float(stop_grace)
            except ValueError:
                grace = -1.0
            if not grace >= 0 or grace == float("inf"):
                print(f"error: --stop-grace-s {stop_grace!r} is not a number of seconds >= 0", file=sys.stderr)
                return 2
            return _launch_local(int(nproc), rest, grace)
    exit_with_launcher()  # a worker of `--nproc`: stop when the launcher dies
    config_path = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if config_path else rest
    hang_dump_s = os.environ.get("MEGACORE_HANG_DUMP_S")
    if hang_dump_s:  # diagnosing a hang: every thread's Python stack to stderr after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(hang_dump_s), exit=False)
    from megacore.training.contract import PeerFailed

    try:
        cfg = load_run_config(config_path, overrides).validate()  # before any key is used (timeout_s below)
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
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run_train(rest)
    if command == "preprocess":
        from megacore.data.preprocess import main as preprocess_main

        return preprocess_main(rest)
    if command == "convert":
        from megacore.checkpoint.convert import main as convert_main

        return convert_main(rest)
    if command == "generate":
        from megacore.inference.generate import main as generate_main

        return generate_main(rest)
    if command == "serve":
        from megacore.inference.server import main as serve_main

        return serve_main(rest)
    print(f"error: unknown command {command!r}; use one of train, preprocess, convert, generate\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
