"""What ``megacore serve`` builds before it listens: the model (one device, or this rank's TP shard),
the tokenizer and chat template, the KV store and runner, and on rank 0 the engine.

Every rank of a tensor-parallel run calls ``prepare`` (loading and probing the cache shapes are
collective); rank 0 gets the engine (its runner broadcasts each call), the others ``follow``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class SetupError(ValueError):
    """The model, tokenizer or options cannot be served; the message says what to change."""


@dataclass
class Setup:
    is_leader: bool
    runner: Any
    engine: Any = None
    ctx: Any = None
    chat_source: str = ""
    broadcast: Any = None

    def follow(self) -> None:
        from megacore.inference.parallel import follow

        try:
            follow(self.runner)
        finally:
            _destroy()

    def release(self) -> None:
        """Rank 0 is done: release the followers (tensor parallel) and leave the process group."""
        if self.broadcast is not None:
            self.broadcast.stop()
            self.broadcast = None
            _destroy()


def _destroy() -> None:
    import torch.distributed as dist

    from megacore import parallel

    if parallel.is_initialized():
        parallel.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def prepare(args) -> Setup:
    from megacore.config import ConfigError
    from megacore.inference.generate import GenerateError

    try:
        return _prepare(args)
    except (GenerateError, ConfigError, FileNotFoundError) as e:
        raise SetupError(str(e)) from None
    except ValueError as e:
        if isinstance(e, SetupError):
            raise
        raise SetupError(str(e)) from None


def _prepare(args) -> Setup:
    from megacore.config import load_run_config
    from megacore.inference.engine import build_runner
    from megacore.inference.generate import LoadedModel, _device, find_tokenizer, load_model
    from megacore.precision.mixed import DTYPES

    for name in ("max_batch", "max_queue", "block_size", "decode_steps", "max_prefill_tokens", "tp", "pp"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = DTYPES[args.dtype] if args.dtype else None
    run_cfg = load_run_config(args.config) if args.config else None
    config_model = None
    if run_cfg is not None:
        def config_model():  # only for a checkpoint that records no model config (as megacore generate)
            tok = find_tokenizer(LoadedModel(None, "megacore", args.model, tokenizer_dirs=[args.model]),
                                 args.tokenizer, run_cfg)
            if tok is not None:
                run_cfg.model.vocab_size = tok.vocab_size
            return run_cfg.model
    if args.tp > 1 and args.pp > 1:
        raise SetupError(f"--tp {args.tp} with --pp {args.pp}: tensor and pipeline parallelism together are not "
                         "supported for inference; use one of them")
    ranks = args.tp * args.pp
    if ranks > 1 or world > 1:
        flag = f"--tp {args.tp}" if args.tp > 1 else f"--pp {args.pp}"
        if world != ranks:
            raise SetupError(f"{flag} runs on {ranks} processes: torchrun --nproc-per-node {ranks} -m megacore serve "
                             f"... (this run has {world}; a multi-process run needs --tp or --pp)")
        from megacore.parallel.topology import init_default_group

        init_default_group("gloo" if os.environ.get("MEGACORE_BACKEND") == "gloo" else None)
        device = _device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if args.tp > 1:
            from megacore.inference.parallel import load_tp_model

            loaded = load_tp_model(args.model, args.tp, dtype, device)
        else:
            from megacore.inference.pipeline import load_pp_model

            loaded = load_pp_model(args.model, args.pp, dtype, device)
    else:
        loaded = load_model(args.model, dtype, _device(args.device), config_model)
    model = loaded.model.eval()
    seq = model.config.seq_length
    max_length = args.max_length or seq
    if not 2 <= max_length <= seq:
        raise SetupError(f"--max-length {max_length} must be in [2, {seq}] (the model's seq_length)")
    if args.pp > 1:
        from megacore.inference.pipeline import build_pipeline_runner

        runner = build_pipeline_runner(model, args.max_batch, max_length, args.block_size, args.num_blocks)
    else:
        runner = build_runner(model, args.max_batch, max_length, args.block_size, args.num_blocks,
                              use_graphs=False if args.no_graphs else None)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return Setup(False, runner)
    try:
        return _leader(args, loaded, run_cfg, model, runner, max_length, world)
    except BaseException:
        if world > 1:  # the followers wait for rank 0's calls: release them
            from megacore.inference.parallel import BroadcastRunner

            BroadcastRunner(runner).stop()
            _destroy()
        raise


def _leader(args, loaded, run_cfg, model, runner, max_length: int, world: int) -> Setup:
    from megacore.inference.chat import ChatTemplate
    from megacore.inference.engine import Engine
    from megacore.inference.generate import find_tokenizer
    from megacore.inference.openai_api import ServeContext

    tokenizer = find_tokenizer(loaded, args.tokenizer, run_cfg)
    eos = loaded.eos_ids or ([tokenizer.eod] if tokenizer is not None else [])
    broadcast = None
    if world > 1:
        from megacore.inference.parallel import BroadcastRunner

        broadcast = BroadcastRunner(runner)
    engine = Engine(model, max_batch=args.max_batch, max_length=max_length, block_size=args.block_size,
                    eos_ids=eos, tokenizer=tokenizer, max_queue=args.max_queue, decode_steps=args.decode_steps,
                    runner=broadcast or runner, max_prefill_tokens=args.max_prefill_tokens,
                    prefix_caching=args.prefix_caching)
    dirs = list(loaded.tokenizer_dirs)
    if args.tokenizer:
        path = Path(args.tokenizer)
        dirs.insert(0, path if path.is_dir() else path.parent)
    chat = ChatTemplate.find(dirs)
    ctx = ServeContext(args.served_model_name or args.model, max_length, model.config.vocab_size, tokenizer, chat)
    return Setup(True, runner, engine, ctx, chat.source, broadcast)

