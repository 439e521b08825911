"""What one optimizer step did, possibly still on the device (``MixedPrecisionOptimizer.step``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch



def read_scalars(values: Sequence) -> list:
    """Host numbers of ``values``: numbers (and None) pass through; one-element tensors become
    Python floats, read with ONE device->host copy per device (all of a device's values are
    stacked as float64 first, which is exact for fp32/fp64/integer values).

    Reading a CUDA tensor waits until the GPU has computed it (and everything queued before it):
    call this where the caller has decided to synchronize, with every value it needs at once.
    """
    out = list(values)
    by_device: dict = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in idx])
        for i, x in zip(idx, stacked.tolist()):
            out[i] = x
    return out


class StepInfo:
    """What ``step()`` did: ``skipped`` (inf/nan grads), the global ``grad_norm`` before clipping
    (None when skipped for overflow) and the ``loss_scale`` in force (None without a scaler).

    ``skipped`` and ``grad_norm`` may still be device tensors when ``step()`` returns (fused AdamW:
    the step was decided on the GPU and the host did not wait for it). Reading either attribute
    resolves both with one device->host copy, which waits for the GPU to finish the step. To read
    them together with other device values in one copy, take :meth:`pending`, read everything
    (``read_scalars``) and hand the numbers back to :meth:`resolve`::

        info = opt.step()                 # returns at once
        ...                               # queue more GPU work
        info.grad_norm                    # waits here (or: info.resolve(values_read_elsewhere))
    """

    __slots__ = ("_skipped", "_grad_norm", "loss_scale")

    def __init__(self, skipped, grad_norm, loss_scale: Optional[float]):
        self._skipped = skipped        # bool, or a 0-dim tensor (non-zero: skipped)
        self._grad_norm = grad_norm    # float/None, or a 0-dim tensor
        self.loss_scale = loss_scale

    def pending(self) -> list[torch.Tensor]:
        """The values not read yet, in a fixed order (``[skipped, grad_norm]``, those that are tensors)."""
        return [v for v in (self._skipped, self._grad_norm) if isinstance(v, torch.Tensor)]

    @property
    def ready(self) -> bool:
        """True when every value is a host number (reading one does not wait for the device)."""
        return not self.pending()

    def resolve(self, values: Optional[Sequence[float]] = None) -> "StepInfo":
        """Turn the pending device values into numbers: ``values`` are the host numbers of
        :meth:`pending`, in that order (already read by the caller); None reads them here."""
        tensors = self.pending()
        if not tensors:
            return self
        values = list(read_scalars(tensors) if values is None else values)
        if len(values) != len(tensors):
            raise ValueError(f"StepInfo.resolve got {len(values)} values for {len(tensors)} pending tensors")
        if isinstance(self._skipped, torch.Tensor):
            self._skipped = bool(values.pop(0) != 0)
        if isinstance(self._grad_norm, torch.Tensor):
            self._grad_norm = float(values.pop(0))
        return self

    @property
    def skipped_flag(self):
        """``skipped`` as it stands, without reading it: a bool, or a 0-dim device tensor."""
        return self._skipped

    @property
    def skipped(self) -> bool:
        return self.resolve()._skipped

    @property
    def grad_norm(self) -> Optional[float]:
        return self.resolve()._grad_norm

    def __repr__(self) -> str:
        show = lambda v: "<on device>" if isinstance(v, torch.Tensor) else repr(v)  # noqa: E731
        return (f"StepInfo(skipped={show(self._skipped)}, grad_norm={show(self._grad_norm)}, "
                f"loss_scale={self.loss_scale!r})")
