"""Deterministic initialization: a seed defines the full global model, whatever the layout.

Each parameter is filled from a CPU generator seeded by ``(seed, global parameter name)``: the FULL
tensor is drawn (shape ``peek_meta(param).global_shape`` if the parameter is a shard, else its own
shape) and, when the parameter is a shard, only this rank's slice is kept (``ParamMeta.shard``). A TP=2 rank
therefore holds exactly half of the TP=1 weight, and a pipeline stage holding layers 8..15 holds
exactly those layers of the one-device model, because layer names are global.

Init kinds (``peek_meta(param).init``, set by the module that owns the parameter):
``normal`` N(0, init_std); ``scaled_normal`` N(0, init_std / sqrt(2·num_layers)) for the output
projections of each residual branch (when ``scaled_output_init``); ``ones``; ``zeros``; and for
Mamba mixers ``mamba_A_log``, ``mamba_dt_bias`` and ``conv_uniform`` (``megacore.layers.mamba``).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
from torch import nn

from megacore.config import TransformerConfig
from megacore.sharding import peek_meta


def _name_seed(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) * 1_000_003 + seed) % (2 ** 63 - 1)


def full_init_tensor(kind: str, shape, config: TransformerConfig, seed: int, name: str) -> torch.Tensor:
    """The full fp32 tensor that parameter ``name`` starts from, always on the CPU (also inside a
    ``with torch.device("cuda")`` block: the seeded generator is a CPU one, so the values do not
    depend on the device)."""
    if kind == "ones":
        return torch.ones(shape, device="cpu")
    if kind == "zeros":
        return torch.zeros(shape, device="cpu")
    if kind == "mamba_A_log":  # A_h = h for heads 1..H (Mamba-2), stored as log
        return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32, device="cpu"))
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    if kind == "mamba_dt_bias":  # dt log-uniform in [1e-3, 0.1], stored as softplus⁻¹(dt)
        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.rand(shape, generator=gen, device="cpu") * (hi - lo) + lo)
        return dt + torch.log(-torch.expm1(-dt))
    if kind == "conv_uniform":  # a depthwise conv1d's weight and bias, as nn.Conv1d draws them
        bound = 1.0 / math.sqrt(config.mamba_conv_kernel)
        return (torch.rand(shape, generator=gen, device="cpu") * 2 - 1) * bound
    std = config.init_std
    if kind == "scaled_normal" and config.scaled_output_init:
        std = config.init_std / math.sqrt(2.0 * config.num_layers)
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=gen)


def _default_kind(name: str, param: torch.Tensor) -> str:
    if name.endswith("bias"):
        return "zeros"
    return "normal" if param.dim() >= 2 else "ones"


@torch.no_grad()
def materialize(model: nn.Module, config: TransformerConfig, seed: int,
                device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
                fill: bool = True) -> nn.Module:
    """Allocate (if on meta) and fill every parameter of ``model`` deterministically, and reset the
    state buffers of modules that have a ``reset_buffers()``; returns it.

    ``device``/``dtype`` default to the parameters' current ones (meta parameters go to CPU).
    ``fill=False`` only allocates (the values are left as they are: a checkpoint is loaded next).
    """
    # to_empty()/to() create new Parameter objects: carry their descriptions (ParamMeta) and megacore's
    # other per-parameter state across.
    saved = {name: {k: v for k, v in vars(p).items() if k.startswith("_megacore")}
             for name, p in model.named_parameters(remove_duplicate=False)}
    first = next(model.parameters(), None)
    if first is not None and first.is_meta:
        target = torch.device(device) if device is not None else torch.device("cpu")
        model.to_empty(device=target)
    elif device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    for name, param in model.named_parameters(remove_duplicate=False):
        for k, v in saved.get(name, {}).items():
            setattr(param, k, v)
    # to_empty() leaves buffers uninitialized too: modules with state buffers (the MoE layer's
    # balance-loss accumulator, a router's expert bias) set them in ``reset_buffers``; a checkpoint
    # loaded next overwrites the persistent ones.
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    if not fill:
        return model
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights: initialize once, under the first name
            continue
        seen.add(id(param))
        kind = peek_meta(param).init or _default_kind(name, param)
        global_name = (peek_meta(param).global_name or name)
        shape = (peek_meta(param).global_shape or param.shape)
        full = full_init_tensor(kind, tuple(shape), config, seed, global_name)
        shard_fn = peek_meta(param).shard if peek_meta(param).is_sharded else None
        local = shard_fn(full) if shard_fn is not None else full
        if tuple(local.shape) != tuple(param.shape):
            raise RuntimeError(f"shard of {global_name} has shape {tuple(local.shape)}, parameter has {tuple(param.shape)}")
        param.copy_(local)
    return model
