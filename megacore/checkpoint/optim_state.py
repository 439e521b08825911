"""Optimizer state as sharded pieces, for plain torch optimizers and flat-sharded (ZeRO-1) ones.

Plain ``torch.optim`` optimizers (Adam, AdamW, SGD, ...): every state tensor shaped like its
parameter gets the parameter's layout (``optim/exp_avg/<name>`` is sharded exactly like
``model/<name>``); scalar state (``step``) is a replicated 0-d tensor per parameter.

Flat-sharded optimizers (the distributed optimizer) expose ``checkpoint_entries()``: a list of
:class:`FlatStateEntry` ``(param, state_name, flat, start)``, meaning ``flat`` holds elements
``[start, start + flat.numel())`` of that state of the parameter's local tensor, flattened. fp32
master weights are the state named ``master``. ``megacore.checkpoint.sharded.pieces_of_flat_shard``
maps each entry back to global boxes, so a ZeRO-1 checkpoint loads without ZeRO-1 and vice versa.
Their non-tensor state goes through ``checkpoint_common()`` / ``load_checkpoint_common(dict)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megacore.checkpoint.errors import CheckpointError
from megacore.checkpoint.sharded import (MASTER_STATE, OPTIM_PREFIX, ShardedPiece, TensorLayout, optim_key,
                                         param_layouts, pieces_of_flat_shard, pieces_of_tensor)


@dataclass
class FlatStateEntry:
    """``flat`` == elements ``[start, start + flat.numel())`` of state ``state_name`` of ``param`` (local, flattened)."""

    param: torch.nn.Parameter
    state_name: str
    flat: torch.Tensor
    start: int


@dataclass
class OptimizerLoadPlan:
    """Destinations for an optimizer load, built without touching the optimizer.

    ``pending`` holds freshly allocated state for parameters whose state is not created yet (an
    optimizer that has not stepped); it is attached only after every piece loaded.
    """

    pieces: list[ShardedPiece] = field(default_factory=list)
    pending: dict[int, tuple[torch.nn.Parameter, dict[str, Any]]] = field(default_factory=dict)
    python_scalars: list[tuple[torch.nn.Parameter, str, torch.Tensor, str]] = field(default_factory=list)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (state tensor, saved step)


def is_flat_sharded(optimizer) -> bool:
    return callable(getattr(optimizer, "checkpoint_entries", None))


def _layout_of(layouts, p, what: str) -> TensorLayout:
    if id(p) not in layouts:
        raise CheckpointError(f"the {what} holds a parameter of shape {tuple(p.shape)} that is not in model_chunks; "
                              "pass every model chunk of this rank (all virtual pipeline stages)")
    return layouts[id(p)][0]


def describe_optimizer(optimizer, model_chunks) -> tuple[list[ShardedPiece], dict]:
    """(pieces, common) of an optimizer: tensors as global boxes, the rest as JSON-able state."""
    layouts = param_layouts(model_chunks)
    if is_flat_sharded(optimizer):
        pieces = []
        for e in optimizer.checkpoint_entries():
            layout = _layout_of(layouts, e.param, "optimizer")
            pieces += pieces_of_flat_shard(optim_key(e.state_name, layout.name), layout, e.param.shape, e.flat, e.start)
        common = optimizer.checkpoint_common() if hasattr(optimizer, "checkpoint_common") else {}
        step = common.get("step") if isinstance(common, dict) else None
        return pieces, {"kind": type(optimizer).__name__, "flat_sharded": True, "state": common, "step": step}
    pieces, scalars, step = [], {}, None
    for group in optimizer.param_groups:
        for p in group["params"]:
            layout = _layout_of(layouts, p, "optimizer")
            for name, value in optimizer.state.get(p, {}).items():
                key = optim_key(name, layout.name)
                if name == "step" and step is None:
                    step = int(value.item()) if torch.is_tensor(value) else int(value)
                if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape):
                    pieces += pieces_of_tensor(key, layout, value)
                elif torch.is_tensor(value) and value.numel() == 1:
                    pieces.append(ShardedPiece(key, (), (), value.detach().reshape(())))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    pieces.append(ShardedPiece(key, (), (), torch.tensor(float(value), dtype=torch.float64)))
                    scalars[name] = type(value).__name__
                else:
                    raise CheckpointError(f"optimizer state {name!r} of {layout.name} ({type(value).__name__}) is neither "
                                          "a tensor shaped like the parameter nor a scalar; it cannot be checkpointed")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return pieces, {"kind": type(optimizer).__name__, "flat_sharded": False, "param_groups": groups,
                    "python_scalars": scalars, "step": step}


def _state_names_in(index_tensors: dict, param_name: str) -> list[str]:
    suffix = "/" + param_name
    names = []
    for key in index_tensors:
        if key.startswith(OPTIM_PREFIX) and key.endswith(suffix):
            state = key[len(OPTIM_PREFIX):-len(suffix)]
            if "/" not in state:
                names.append(state)
    return sorted(names)


def plan_optimizer_load(optimizer, model_chunks, index_tensors: dict, common: dict) -> OptimizerLoadPlan:
    """Destinations of every optimizer piece this rank needs, without modifying the optimizer.

    Missing master weights (a checkpoint saved without them) are filled from ``model/<name>``.
    """
    layouts = param_layouts(model_chunks)
    plan = OptimizerLoadPlan()
    if is_flat_sharded(optimizer):
        for e in optimizer.checkpoint_entries():
            layout = _layout_of(layouts, e.param, "optimizer")
            key = optim_key(e.state_name, layout.name)
            if e.state_name == MASTER_STATE and key not in index_tensors:
                key = "model/" + layout.name
            plan.pieces += pieces_of_flat_shard(key, layout, e.param.shape, e.flat, e.start)
        return plan
    saved_scalars = common.get("python_scalars", {})
    saved_step = common.get("step")
    for group in optimizer.param_groups:
        capturable = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            layout = _layout_of(layouts, p, "optimizer")
            state = optimizer.state.get(p, {})
            names = [n for n in _state_names_in(index_tensors, layout.name) if n != MASTER_STATE]
            if not state:  # not stepped yet: allocate what the checkpoint holds, attach after loading
                fresh = {}
                for name in names:
                    meta = index_tensors[optim_key(name, layout.name)]
                    if tuple(meta["shape"]) == () and name in saved_scalars:
                        holder = torch.zeros((), dtype=torch.float64)
                        plan.python_scalars.append((p, name, holder, saved_scalars[name]))
                        plan.pieces.append(ShardedPiece(optim_key(name, layout.name), (), (), holder))
                        continue
                    if tuple(meta["shape"]) == ():
                        device = p.device if capturable else torch.device("cpu")
                        fresh[name] = torch.zeros((), dtype=getattr(torch, meta["dtype"]), device=device)
                        plan.pieces.append(ShardedPiece(optim_key(name, layout.name), (), (), fresh[name]))
                    else:
                        fresh[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        plan.pieces += pieces_of_tensor(optim_key(name, layout.name), layout, fresh[name])
                if names and "step" not in names and saved_step is not None:  # saved by a flat-sharded optimizer
                    device = p.device if capturable else torch.device("cpu")
                    fresh["step"] = torch.tensor(float(saved_step), dtype=torch.float32, device=device)
                plan.pending[id(p)] = (p, fresh)
                continue
            for name, value in state.items():
                key = optim_key(name, layout.name)
                if name == "step" and key not in index_tensors and saved_step is not None and torch.is_tensor(value):
                    plan.steps.append((value, torch.tensor(float(saved_step))))
                    continue
                if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape):
                    plan.pieces += pieces_of_tensor(key, layout, value)
                elif torch.is_tensor(value) and value.numel() == 1:
                    plan.pieces.append(ShardedPiece(key, (), (), value.detach().reshape(())))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    holder = torch.zeros((), dtype=torch.float64)
                    plan.python_scalars.append((p, name, holder, type(value).__name__))
                    plan.pieces.append(ShardedPiece(key, (), (), holder))
    return plan


def finish_optimizer_load(optimizer, plan: OptimizerLoadPlan, common: dict) -> None:
    """Attach freshly allocated state, set python scalars and restore group hyperparameters."""
    for p, fresh in plan.pending.values():
        optimizer.state[p].update(fresh)
    for p, name, holder, type_name in plan.python_scalars:
        optimizer.state[p][name] = int(holder.item()) if type_name == "int" else float(holder.item())
    with torch.no_grad():
        for target, value in plan.steps:
            target.copy_(value)
    if is_flat_sharded(optimizer):
        if hasattr(optimizer, "load_checkpoint_common"):
            state = dict(common.get("state") or {}) if common.get("flat_sharded") else {}
            if "step" not in state and common.get("step") is not None:
                state["step"] = common["step"]
            optimizer.load_checkpoint_common(state)
        return
    restore_param_groups(optimizer, common.get("param_groups"))


def restore_param_groups(optimizer, saved_groups: Optional[list]) -> None:
    if not saved_groups:
        return
    for group, saved in zip(optimizer.param_groups, saved_groups):
        for k, v in saved.items():
            if k in group and k != "params":
                group[k] = tuple(v) if isinstance(group[k], tuple) and isinstance(v, list) else v


def check_param_groups(optimizer, common: dict) -> Optional[str]:
    """An error message when the saved optimizer's groups cannot be mapped onto this one."""
    if is_flat_sharded(optimizer) or common.get("flat_sharded"):
        return None
    saved = common.get("param_groups") or []
    if saved and len(saved) != len(optimizer.param_groups):
        return (f"the checkpoint's optimizer has {len(saved)} parameter groups but this optimizer has "
                f"{len(optimizer.param_groups)}; build the optimizer with the same groups, or pass load_optimizer=False")
    return None
