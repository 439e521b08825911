"""Tensor-parallel inference: every rank holds its shard, rank 0 schedules, all ranks step together.

    loaded = load_tp_model(CKPT_DIR, tp=2, device="cuda:0")     # collective; any saved layout
    runner = ModelRunner(loaded.model, store)                    # on every rank, same store shape
    if rank == 0:
        engine = Engine(loaded.model, ..., runner=BroadcastRunner(runner))
        ...; engine.runner.stop()                                # releases the followers
    else:
        follow(runner)                                           # until rank 0 stops

The model is built through the composition root (``megacore.compose.build_parallel_gpt``: the TP
plan of ``megacore.parallel``, without sequence parallelism, which splits the tokens of a step that
has one per sequence) and filled from a megacore checkpoint with ``megacore.checkpoint`` (which
reshards on load: a checkpoint saved at any layout serves at any TP size dividing the heads).
Hugging Face directories are loaded on one device only: convert them first (``megacore convert
--from hf``).

Only rank 0 runs the engine (queue, scheduling, block tables, streaming). Before every prefill,
packed prefill or decode call it broadcasts the call's inputs -- all tensors (``PrefillInputs`` /
``PackedInputs`` / ``DecodeInputs``) -- and the other ranks run the same call on them: the same positions, blocks and sampling
parameters, so each rank writes its heads' keys and values to the same blocks. The logits are
gathered over the vocabulary shards on every rank and the sampler is a function of (seed,
position), so every rank picks the same token without another exchange. Pipeline-parallel
inference runs the same leader/follower protocol over stage runners (``megacore.inference.pipeline``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from megacore.inference.packed import PackedInputs
from megacore.inference.runner import DecodeInputs, ModelRunner, PrefillInputs

_STOP, _PREFILL, _DECODE, _PACKED = 0, 1, 2, 3
_KINDS = {_PREFILL: PrefillInputs, _DECODE: DecodeInputs, _PACKED: PackedInputs}
_DTYPES = [torch.int64, torch.float32, torch.bool]
_MAX_FIELDS = max(len(dataclasses.fields(k)) for k in _KINDS.values())
_HEADER = 3 + 4 * _MAX_FIELDS  # op, steps, key_len; per field: dtype code, ndim, two sizes


def check_serving_world(path: str, flag: str, size: int, unit: str, kind: str) -> None:
    """A model-parallel server (``flag`` = ``--tp``/``--pp`` of ``size``) runs one process per
    ``unit`` and loads a megacore checkpoint; GenerateError naming the fix otherwise."""
    from megacore.inference.generate import GenerateError, detect_format

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != size:
        raise GenerateError(f"{flag} {size} needs {size} processes, one per {unit} (torchrun --nproc-per-node {size} "
                            f"-m megacore serve ...); this run has {world}")
    if detect_format(path) != "megacore":
        raise GenerateError(f"{path!r} is a Hugging Face directory; {kind}-parallel serving loads megacore checkpoints: "
                            f"convert it first (megacore convert --from hf --input {path} --output CKPT_DIR)")


def load_tp_model(path: str, tp: int, dtype: Optional[torch.dtype] = None, device=None):
    """A ``LoadedModel`` holding this rank's TP shard of the checkpoint at ``path`` (collective over
    the default group, whose size must be ``tp``)."""
    from megacore import parallel
    from megacore.compose import build_parallel_gpt
    from megacore.inference.generate import GenerateError, load_megacore

    check_serving_world(path, "--tp", tp, "rank", "tensor")
    state = parallel.get_state() if parallel.is_initialized() else parallel.initialize(tensor=tp)

    def build(config, dtype, device):
        if config.num_kv_heads % tp or config.num_attention_heads % tp:
            raise GenerateError(f"--tp {tp} does not divide the model's {config.num_attention_heads} attention heads "
                                f"and {config.num_kv_heads} key/value heads; pick a divisor")
        return build_parallel_gpt(config, seed=0, state=state, sequence_parallel=False, device=device,
                                  dtype=dtype).eval()

    return load_megacore(path, dtype, torch.device(device or "cpu"), build=build)


def _comm_device(runner: ModelRunner) -> torch.device:
    return runner.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _bcast(t: torch.Tensor, group) -> torch.Tensor:
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t


class BroadcastRunner:
    """A ``ModelRunner`` for rank 0 that first sends every call to the other ranks (``follow``)."""

    def __init__(self, runner: ModelRunner, group=None):
        self.runner, self.group = runner, group
        self.store, self.device = runner.store, runner.device
        self._dev = _comm_device(runner)

    def _send(self, op: int, inputs=None, steps: int = 0, key_len: int = 0) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:3] = torch.tensor([op, steps, key_len or 0])
        tensors = [getattr(inputs, f.name) for f in dataclasses.fields(inputs)] if inputs is not None else []
        for i, t in enumerate(tensors):
            shape = list(t.shape) + [0] * (2 - t.dim())
            header[3 + 4 * i: 7 + 4 * i] = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *shape])
        _bcast(header.to(self._dev), self.group)
        for t in tensors:  # (bool travels as int64: not every backend reduces or sends bool)
            if t.numel() == 0:  # (the shape is in the header: nothing to send)
                continue
            _bcast(t.to(self._dev, torch.int64 if t.dtype == torch.bool else t.dtype).contiguous(), self.group)

    def prefill(self, inp: PrefillInputs):
        self._send(_PREFILL, inp)
        return self.runner.prefill(inp)

    def prefill_packed(self, inp: PackedInputs):
        self._send(_PACKED, inp)
        return self.runner.prefill_packed(inp)

    def decode(self, inp: DecodeInputs, steps: int, key_len: Optional[int] = None) -> torch.Tensor:
        self._send(_DECODE, inp, steps, key_len or 0)
        return self.runner.decode(inp, steps, key_len)

    def stop(self) -> None:
        """Release the followers (their ``follow`` returns)."""
        self._send(_STOP)


def follow(runner: ModelRunner, group=None) -> None:
    """Run every call rank 0's ``BroadcastRunner`` makes, until it stops."""
    dev = _comm_device(runner)
    while True:
        header = _bcast(torch.zeros(_HEADER, dtype=torch.int64, device=dev), group).cpu().tolist()
        op, steps, key_len = header[:3]
        if op == _STOP:
            return
        cls = _KINDS[op]
        values = {}
        for i, f in enumerate(dataclasses.fields(cls)):
            code, ndim, d0, d1 = header[3 + 4 * i: 7 + 4 * i]
            shape = [d0, d1][:ndim]
            dtype = _DTYPES[code]
            got = torch.empty(shape, dtype=torch.int64 if dtype == torch.bool else dtype, device=dev)
            if got.numel():
                _bcast(got, group)
            values[f.name] = got.to("cpu", dtype)
        inputs = cls(**values)
        if op == _PREFILL:
            runner.prefill(inputs)
        elif op == _PACKED:
            runner.prefill_packed(inputs)
        else:
            runner.decode(inputs, steps, key_len or None)
