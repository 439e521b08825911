"""FSDP2 bridge: shard a megacore model with ``torch.distributed.fsdp.fully_shard`` (ZeRO-3).

Each transformer layer becomes one FSDP unit (its parameters are all-gathered just before the
layer runs and freed after), then the root wraps what is left (embeddings, final norm, output
layer). Parameters become ``DTensor`` shards on ``dp_mesh``; a plain ``torch.optim.AdamW`` on
``model.parameters()`` then steps only the local shards, and ``torch.nn.utils.clip_grad_norm_``
computes the global norm through DTensor.

Gradients are SUMMED over the mesh (divide factor 1), matching the loss-normalization contract of
``megacore.distributed.ddp`` (loss divided by the global labelled-token count). For gradient
accumulation run the non-final micro-batches inside :func:`fsdp_no_sync`.

Mixed precision is FSDP's ``MixedPrecisionPolicy``: keep fp32 parameters (the sharded "masters"),
compute in ``param_dtype`` and reduce gradients in ``reduce_dtype``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn


def _import_fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # pragma: no cover - torch >= 2.6 has it
        raise ImportError("apply_fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
                          "upgrade torch or use DistributedDataParallel + DistributedOptimizer") from e
    return fully_shard, MixedPrecisionPolicy, FSDPModule


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The per-layer FSDP units of a megacore ``GPTModel`` (``model.decoder.layers``); of a
    ``LlavaModel``, its language model's and its vision tower's layers."""
    if hasattr(model, "language_model") and hasattr(model, "vision_tower"):
        return transformer_layers(model.language_model) + list(model.vision_tower.encoder.layers.values())
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    raise ValueError(f"cannot find transformer layers on {type(model).__name__} (expected model.decoder.layers); "
                     "pass layers=[...] with the modules to shard one by one")


def mixed_precision_policy(param_dtype: Union[None, str, torch.dtype] = None,
                           reduce_dtype: Union[None, str, torch.dtype] = torch.float32):
    """``MixedPrecisionPolicy`` from dtypes or names ("bf16", "fp16", "fp32"); None keeps the param dtype."""
    from megacore.precision.mixed import resolve_dtype

    _, MixedPrecisionPolicy, _ = _import_fsdp()
    pd = resolve_dtype(param_dtype) if param_dtype is not None else None
    rd = resolve_dtype(reduce_dtype) if reduce_dtype is not None else None
    return MixedPrecisionPolicy(param_dtype=pd, reduce_dtype=rd)


def apply_fsdp(model: nn.Module, dp_mesh=None, mp_policy=None, *, layers: Optional[Iterable[nn.Module]] = None,
               reshard_after_forward: bool = True, sum_gradients: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each layer of ``layers`` (default: its transformer
    layers), then the root. Returns the model (now also an ``FSDPModule``).

    Args:
        dp_mesh: 1-D ``DeviceMesh`` of the data-parallel ranks (default: all ranks, on the
            parameters' device type).
        mp_policy: a ``MixedPrecisionPolicy``, a dtype / dtype name for the compute dtype (gradients
            reduced in fp32), or None (no casting).
        reshard_after_forward: free gathered layer params after forward (ZeRO-3); False keeps them
            until backward (ZeRO-2-like: more memory, one all-gather fewer).
        sum_gradients: reduce by SUM (the megacore contract) instead of FSDP's default mean.
    """
    fully_shard, MixedPrecisionPolicy, FSDPModule = _import_fsdp()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("apply_fsdp needs torch.distributed initialized (torchrun, or "
                           "dist.init_process_group) even for one rank")
    if dp_mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        dp_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    elif not isinstance(mp_policy, MixedPrecisionPolicy):
        mp_policy = mixed_precision_policy(mp_policy)
    units = list(layers) if layers is not None else transformer_layers(model)
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                _set_sum_reduction(m)
    return model


def _set_sum_reduction(m) -> None:
    # The factor is per FSDP unit (not recursive), hence the loop in apply_fsdp. factor=1 alone maps to
    # PREMUL_SUM, which gloo lacks; forcing plain SUM works on every backend.
    if hasattr(m, "set_gradient_divide_factor"):
        m.set_gradient_divide_factor(1.0)
    else:  # torch releases before the rename
        m.set_reduce_scatter_divide_factor(1.0)
    if hasattr(m, "set_force_sum_reduction_for_comms"):
        m.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    """Skip gradient reduce-scatter for the backward passes inside (gradient-accumulation micro-batches)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
