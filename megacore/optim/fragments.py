"""The pieces ``MixedPrecisionOptimizer`` steps: ``Fragment`` (a flat range of one parameter and
its master), ``make_master`` (an fp32 copy of a half-precision range, else the range itself),
``StateEntry`` (a flat range of one optimizer state, for checkpoints), and the weight-decay split
into ``torch.optim`` groups (``weight_decay_groups``: no decay for biases, norm weights and every
other 1-D parameter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


def default_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """No weight decay for biases, norm weights and every other 1-D parameter."""
    return param.dim() < 2 or name.endswith("bias")


def weight_decay_groups(module: nn.Module, weight_decay: float,
                        no_weight_decay: Callable[[str, torch.Tensor], bool] = default_no_weight_decay) -> list[dict]:
    """Two ``torch.optim`` groups ``[decay, no_decay]`` of the trainable params of ``module``."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class StateEntry:
    """``flat`` (live storage) == elements ``[start, start + flat.numel())`` of state ``state_name``
    of ``param`` flattened (the ``checkpoint_entries()`` protocol of megacore.checkpoint)."""

    param: nn.Parameter
    state_name: str
    flat: torch.Tensor
    start: int


@dataclass
class Fragment:
    """The optimizer's piece ``[start, end)`` of ``param`` (flattened): ``master`` is what AdamW steps."""

    name: str
    param: nn.Parameter
    start: int
    end: int
    master: torch.Tensor
    has_master_copy: bool   # False: master is a view of the weights themselves
    group: int              # 0 = weight decay, 1 = no weight decay

    def model_view(self) -> torch.Tensor:
        return self.param.data.view(-1)[self.start:self.end]

    def grad_view(self) -> Optional[torch.Tensor]:
        g = getattr(self.param, "main_grad", None)
        g = g if g is not None else self.param.grad
        return None if g is None else g.reshape(-1)[self.start:self.end]


def make_master(view: torch.Tensor, master_weights: bool) -> tuple[torch.Tensor, bool]:
    """(master, has_copy): an fp32 copy of a half-precision ``view``, else ``view`` itself."""
    if master_weights and view.dtype in (torch.bfloat16, torch.float16):
        return view.detach().to(torch.float32).clone(), True
    return view.detach(), False
