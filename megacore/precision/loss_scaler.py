"""Loss scaling for fp16 training: constant and dynamic (with hysteresis).

fp16 has a narrow exponent range, so small gradients underflow to zero. The loss is multiplied by
``scale`` before backward (every gradient is then ``scale`` times too large), and the optimizer
multiplies the gradients by ``1/scale`` before using them. If any gradient overflowed to inf/nan
on ANY rank, every rank skips the step together (``found_inf`` is max-reduced over the given model-
and data-parallel groups) and a dynamic scaler lowers the scale.

Dynamic rule (same as Megatron-LM):

* overflow: ``growth_tracker = 0``; ``hysteresis_tracker -= 1``; when it reaches 0,
  ``scale = max(scale * backoff_factor, min_scale)`` (the tracker stays at 0, so further overflows
  back off at once).
* ``growth_interval`` consecutive good steps: ``scale = min(scale * growth_factor, max_scale)`` and
  ``hysteresis_tracker = hysteresis`` again.

bf16 shares fp32's exponent range and needs no loss scaling.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megacore.distributed.comm import ProcessGroup, active_groups, all_reduce_over, comm_device


def unscale_and_check_(grads: Sequence[torch.Tensor], inv_scale: float, groups: Sequence[ProcessGroup] = ()) -> bool:
    """Multiply ``grads`` in place by ``inv_scale`` and report whether any element on any rank is inf/nan.

    ``found_inf`` is max-reduced over ``groups`` (each rank usually checks a different part of the
    model or, with the distributed optimizer, a different shard), so all ranks get the same answer.
    """
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    flags = []
    for (device, _), tensors in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inv)
        except (RuntimeError, NotImplementedError):  # dtype/device without the fused kernel
            for t in tensors:
                found.add_((~torch.isfinite(t)).any().float())
                t.mul_(inv_scale)
        flags.append(found)
    device = grads[0].device if grads else torch.device("cpu")
    found_any = torch.zeros(1, dtype=torch.float32, device=device)
    for f in flags:
        found_any = torch.maximum(found_any, f.to(device).clamp(max=1.0))
    if active_groups(groups):
        found_any = all_reduce_over(found_any.to(comm_device(device)), groups, op=dist.ReduceOp.MAX)
    return bool(found_any.item() > 0)


class LossScaler:
    """Base class: a scale, unscaling with inf/nan detection, and a per-step update."""

    scale: float

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call backward on this."""
        return loss * self.scale

    def unscale_and_check_(self, grads: Sequence[torch.Tensor], groups: Sequence[ProcessGroup] = ()) -> bool:
        return unscale_and_check_(grads, self.inv_scale, groups)

    def update(self, found_inf: bool) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class ConstantLossScaler(LossScaler):
    """A fixed scale; steps with inf/nan gradients are still skipped."""

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"loss scale {scale} must be positive; use e.g. 1024.0")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "constant", "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler(LossScaler):
    """Scale that backs off on overflow (after ``hysteresis`` overflows) and grows after
    ``growth_interval`` (the "window") consecutive overflow-free steps. See the module docstring."""

    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2,
                 max_scale: float = float("inf")):
        checks = [
            (initial_scale > 0, f"initial_scale={initial_scale} must be positive; use e.g. 65536"),
            (min_scale > 0, f"min_scale={min_scale} must be positive; use e.g. 1.0"),
            (growth_factor > 1, f"growth_factor={growth_factor} must be > 1; use 2.0"),
            (0 < backoff_factor < 1, f"backoff_factor={backoff_factor} must be in (0, 1); use 0.5"),
            (growth_interval >= 1, f"growth_interval={growth_interval} must be >= 1; use e.g. 1000"),
            (hysteresis >= 1, f"hysteresis={hysteresis} must be >= 1; use 1 to back off on every overflow"),
            (max_scale >= initial_scale >= min_scale,
             f"need min_scale <= initial_scale <= max_scale, got {min_scale}, {initial_scale}, {max_scale}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.scale = float(initial_scale)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.growth_tracker = 0
        self.hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.hysteresis_tracker = 0
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale = min(self.scale * self.growth_factor, self.max_scale)

    def state_dict(self) -> dict:
        return {"kind": "dynamic", "scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


def build_loss_scaler(dtype: torch.dtype, initial_scale: float = 2.0 ** 16, window: int = 1000,
                      min_scale: float = 1.0, hysteresis: int = 2, constant_scale=None):
    """The scaler a run in ``dtype`` needs: dynamic for fp16 (constant if ``constant_scale``), None otherwise.

    Arguments mirror ``PrecisionConfig`` (initial_loss_scale, loss_scale_window, min_loss_scale, hysteresis).
    """
    if dtype != torch.float16:
        return None
    if constant_scale is not None:
        return ConstantLossScaler(constant_scale)
    return DynamicLossScaler(initial_scale=initial_scale, min_scale=min_scale, growth_interval=window,
                             hysteresis=hysteresis)
