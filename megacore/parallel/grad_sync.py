"""Gradient sums over tensor-parallel ranks for parameters whose gradient is split across them.

Two kinds of parameters need them (``peek_meta(param).tp_grad_sum``):

* ``"all"``: replicated on every TP rank, but each rank computes only part of the gradient — norm
  weights/biases under sequence parallelism (each rank sees S/t tokens) and QK-norm weights (each
  rank normalizes only its heads). grad <- Σ over the TP group.
* ``"replicas"``: rows of a TP-sharded weight that several ranks hold (grouped QKV with more TP
  ranks than KV groups: k/v rows of a group live on the t/num_kv ranks sharing it, each seeing
  only its query heads). grad[rows] <- Σ over the ranks holding those rows
  (``replica_sum``). Every holder then has the same values; the global grad norm counts
  them on their owner rank only (``TPLayout.owned_mask``, ``megacore.distributed.grad_clip``).

How (``mode``):

* ``"hook"`` (default): a gradient hook on the parameter does the sum during backward, before the
  gradient is accumulated into ``.grad`` (so DDP's ``main_grad`` and every optimizer see the final
  value; nothing to call). Because ``materialize``/``to_empty`` replace parameter objects, the
  owning module carries a forward pre-hook that (re)installs the hook on whatever parameter object
  it holds when it runs.
* ``"finalize"``: no hooks; the training loop calls ``finalize_grads_tp(model)`` once after the
  last backward of a step (before gradient clipping and the optimizer). All ``"all"`` gradients go
  in one coalesced all-reduce, which is cheaper than many tiny ones on a GPU.

``finalize_grads_tp`` is safe to call in either mode (it skips hook-synced parameters).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from megacore.parallel import collectives as C
from megacore.sharding import TPLayout, param_meta

ALL, REPLICAS = "all", "replicas"
MODES = ("hook", "finalize")


def replica_sum(layout: TPLayout, local: torch.Tensor, rank: int, group) -> torch.Tensor:
    """Sum the replicated rows of ``local`` over the ranks holding them (one all-reduce over the
    TP group of a compact buffer of just the replicated rows); other rows pass through."""
    key = ("replica", rank)
    if key not in layout._cache:
        rep = layout.holders() > 1
        compact = torch.cumsum(rep.long(), 0) - 1
        glob = layout.local_index(rank)
        sel = rep[glob]
        layout._cache[key] = (torch.nonzero(sel).flatten(), compact[glob[sel]], int(rep.sum()))
    local_idx, compact_idx, n = layout._cache[key]
    if n == 0:
        return local
    local_idx, compact_idx = local_idx.to(local.device), compact_idx.to(local.device)
    moved = local.movedim(layout.dim, 0)
    buf = moved.new_zeros((n, *moved.shape[1:]))
    buf.index_copy_(0, compact_idx, moved.index_select(0, local_idx))
    buf = C.all_reduce(buf, group)
    out = moved.index_copy(0, local_idx, buf.index_select(0, compact_idx))
    return out.movedim(0, layout.dim)


def _sum_grad(kind: str, group, layout, rank: int, grad: torch.Tensor) -> torch.Tensor:
    if kind == ALL:
        return C.all_reduce(grad, group)
    return replica_sum(layout, grad, rank, group)


def _install_hooks(module: nn.Module, args) -> None:
    """Forward pre-hook: make sure every marked parameter of ``module`` carries the grad hook."""
    spec = module._megacore_tp_sync
    hooked = module.__dict__.setdefault("_megacore_tp_hooked", {})
    for name, (kind, group, layout, rank) in spec.items():
        p = module._parameters.get(name)
        if p is None or not p.requires_grad:
            continue
        ref = hooked.get(name)
        if ref is not None and ref() is p:
            continue
        p.register_hook(lambda g, _k=kind, _g=group, _l=layout, _r=rank: _sum_grad(_k, _g, _l, _r, g))
        hooked[name] = weakref.ref(p)


_PRE_HOOK = None


def _pre_hook():
    """``_install_hooks`` kept out of compiled graphs (plain Python bookkeeping). Wrapped on first
    use because ``torch.compiler.disable`` imports dynamo (about a second) and most runs never need it."""
    global _PRE_HOOK
    if _PRE_HOOK is None:
        _PRE_HOOK = torch.compiler.disable(_install_hooks)
    return _PRE_HOOK


def mark_tp_grad_sum(module: nn.Module, param_name: str, kind: str, group, mode: str = "hook",
                     layout=None, rank: int = 0) -> None:
    """Declare that ``module.<param_name>``'s gradient needs a TP sum of ``kind`` (see the module doc)."""
    if kind not in (ALL, REPLICAS):
        raise ValueError(f"kind={kind!r} is not known; use 'all' or 'replicas'")
    if mode not in MODES:
        raise ValueError(f"grad sync mode={mode!r} is not known; use one of {list(MODES)}")
    if C.group_size(group) == 1:
        return
    param = getattr(module, param_name)
    param_meta(param).tp_grad_sum = kind
    spec = module.__dict__.get("_megacore_tp_sync")
    if spec is None:
        spec = module._megacore_tp_sync = {}
        module._megacore_tp_sync_mode = mode
        if mode == "hook":
            module.register_forward_pre_hook(_pre_hook())
    elif module._megacore_tp_sync_mode != mode:
        raise ValueError(f"module {type(module).__name__} already syncs gradients in mode "
                         f"{module._megacore_tp_sync_mode!r}, not {mode!r}")
    spec[param_name] = (kind, group, layout, rank)


def finalize_grads_tp(model: nn.Module) -> None:
    """Sum the TP-split gradients of ``mode="finalize"`` parameters (``main_grad`` if present, else
    ``.grad``), in place. Call after the last backward of a step, on every TP rank. No-op for
    modules in hook mode and when nothing is marked."""
    coalesced: dict[int, tuple[object, list[torch.Tensor]]] = {}
    for module in model.modules():
        spec: Optional[dict] = module.__dict__.get("_megacore_tp_sync")
        if not spec or module._megacore_tp_sync_mode != "finalize":
            continue
        for name, (kind, group, layout, rank) in spec.items():
            p = module._parameters.get(name)
            if p is None:
                continue
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is None:
                continue
            if kind == ALL:
                coalesced.setdefault(id(group), (group, []))[1].append(grad)
            else:
                grad.copy_(replica_sum(layout, grad, rank, group))
    for group, grads in coalesced.values():
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = C.all_reduce(torch.cat([g.reshape(-1) for g in same]), group)
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
