"""Mixed-precision AdamW: fp32 master weights, loss-scale aware, global grad clipping.

``MixedPrecisionOptimizer`` steps ``torch.optim.AdamW`` (fused on CUDA, torch's default otherwise) on
*master* tensors and copies the result back into the model:

* bf16/fp16 parameter: the master is an fp32 copy; gradients come from ``param.main_grad`` (DDP's
  fp32 accumulation buffer) or ``param.grad``; after the step the master is rounded into the param.
* fp32 parameter (or ``master_weights=False``): no copy; the master is a view of the weights.

Every master is a flat range ``[start, end)`` of one parameter (flattened). Here the range is the
whole parameter; ``megacore.distributed.DistributedOptimizer`` reuses this class with ranges that
are each data-parallel rank's shard of the flat gradient buffer, so everything below — grad
gathering, unscaling, clipping, state dicts — is shared.

One ``step()``::

    finish DDP's gradient reduction (no-op when the loop already did)
    grads -> master.grad (views of main_grad when dtypes match)
    [fp16] unscale by 1/loss_scale, found_inf max-reduced over model-parallel + DP groups;
           any inf/nan: skip the step on every rank, scaler backs off
    global grad norm (each element counted once, see megacore.distributed.grad_clip); skip if not finite
    clip to ``clip_grad``; AdamW on the masters; masters -> params; (distributed: all-gather params)

Host synchronization. With fused AdamW (the default for CUDA masters) ``step()`` never waits for
the GPU in bf16/fp32: the grad norm stays a device tensor and clipping and the non-finite skip are
folded into the fused kernel through the two optional tensors torch's fused Adam/AdamW read from
the optimizer object: ``grad_scale`` (every gradient is divided by it; here
``max(1, (norm + 1e-6) / clip_grad)``, i.e. the clip factor, or None without clipping) and
``found_inf`` (when it is 1 the kernel leaves params and moments alone and torch undoes the step
counter increment; here ``1`` when the norm is inf/nan). The step's ``StepInfo`` then holds device
tensors that are read when someone asks (:class:`StepInfo`), and ``num_steps`` counts the skipped
steps on the device until it is read (at checkpoint time). The masters -> params copy and the
distributed optimizer's param all-gather run either way (a skipped step copies unchanged values).
The syncs that remain: fp16 reads ``found_inf`` of the unscale check (the dynamic loss scaler
updates its scale on the host), and the non-fused path (CPU, or ``fused=False``) reads the norm
as before (``float(norm)``, then ``scale_grads_``) -- free on CPU, identical numbers.

Weight decay: parameters with ``no_weight_decay(name, param)`` (default: 1-D params — biases and
norm weights — and any ``*.bias``) go to a group with ``weight_decay=0``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import nn

from megacore.distributed.comm import ProcessGroup, active_groups, all_reduce_over, comm_device
from megacore.distributed.grad_clip import counted_grads, default_is_tp_replicated, local_norm_power, scale_grads_
from megacore.optim.fragments import (  # noqa: F401 (re-exported: the optimizer's building blocks)
    Fragment, StateEntry, default_no_weight_decay, make_master, weight_decay_groups)
from megacore.optim.step_info import StepInfo, read_scalars

if TYPE_CHECKING:  # runtime import would be circular (loss_scaler -> distributed -> this module)
    from megacore.precision.loss_scaler import LossScaler

STATE_FORMAT = "megacore.optimizer.v1"
MOMENT_NAMES = ("exp_avg", "exp_avg_sq")
_IMPLEMENTATION_KEYS = {"fused", "foreach", "capturable", "differentiable"}


class MixedPrecisionOptimizer:
    """AdamW over (sharded) master weights; see the module docstring.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (then ``step()`` first finishes
            any outstanding gradient reduction, ``zero_grad()`` zeroes the grad buffers and found_inf
            is also reduced over the DP group), or a list of them (the chunks of a virtual pipeline
            stage: one optimizer steps them together). Build the optimizer after wrapping: DDP may
            move parameters into flat buffers.
        lr, betas, eps, weight_decay: AdamW hyperparameters (per group ``lr`` may be changed later
            through ``param_groups``, as LR schedules do).
        clip_grad: global grad-norm clip (0: no clipping; the norm is still computed and returned).
        loss_scaler: a ``LossScaler`` for fp16 (None for fp32/bf16).
        master_weights: keep fp32 masters for bf16/fp16 params (False: step the params directly).
        model_parallel_groups: groups the model is split over, e.g. ``(tp_group, pp_group)``: the
            grad norm and found_inf are reduced over them.
        tp_group, is_tp_replicated: count TP-replicated params once in the norm (TP rank 0).
        expert_parallel_group: the EP group when MoE experts are split over ranks: each rank holds
            other experts, so their part of the grad norm is summed over it as well.
        expert_tp_group: the expert-tensor-parallel group when experts are split by hidden units as
            well. With expert parallelism the expert part of the norm is summed over the expert
            model-parallel groups (EP, ETP, and those of ``model_parallel_groups`` other than
            ``tp_group``) and counted on every rank that holds it: the EP group may lie inside
            the TP group, whose ranks then hold different experts.
        fused / foreach: AdamW implementation (default: fused when the masters are on CUDA).
    """

    shards_over_dp = False  # DistributedOptimizer: each DP rank owns a shard of the state

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_grad: float = 0.0,
                 loss_scaler: Optional[LossScaler] = None, master_weights: bool = True,
                 model_parallel_groups: Sequence[ProcessGroup] = (), tp_group: ProcessGroup = None,
                 is_tp_replicated: Callable[[torch.Tensor], bool] = default_is_tp_replicated,
                 no_weight_decay: Callable[[str, torch.Tensor], bool] = default_no_weight_decay,
                 fused: Optional[bool] = None, foreach: Optional[bool] = None,
                 expert_parallel_group: ProcessGroup = None, expert_tp_group: ProcessGroup = None):
        if clip_grad < 0:
            raise ValueError(f"clip_grad={clip_grad} must be >= 0 (0 disables clipping)")
        from megacore.distributed.ddp import DistributedDataParallel

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        if not chunks:
            raise ValueError("the optimizer got an empty list of model chunks; pass the model (or its chunks)")
        self.ddps = [m for m in chunks if isinstance(m, DistributedDataParallel)]
        if self.ddps and len(self.ddps) != len(chunks):
            raise ValueError("wrap either every model chunk in DistributedDataParallel or none of them")
        self.modules = [m.module if isinstance(m, DistributedDataParallel) else m for m in chunks]
        if not self.shards_over_dp and any(d.use_distributed_optimizer for d in self.ddps):
            raise ValueError("the model was wrapped with DistributedDataParallel(use_distributed_optimizer=True), whose "
                             "gradients are only reduced within each rank's shard; use DistributedOptimizer, or wrap "
                             "with use_distributed_optimizer=False for MixedPrecisionOptimizer")
        self.clip_grad, self.loss_scaler, self.master_weights = clip_grad, loss_scaler, master_weights
        self.model_parallel_groups = tuple(model_parallel_groups)
        self.expert_parallel_group, self.expert_tp_group = expert_parallel_group, expert_tp_group
        self.tp_group, self.is_tp_replicated = tp_group, is_tp_replicated
        self.no_weight_decay = no_weight_decay
        self._num_steps = 0                              # steps applied, as far as the host knows
        self._device_skips: Optional[torch.Tensor] = None  # skips decided on the device, not read yet
        self._device_steps = 0                           # steps attempted on the device since last read
        self.fragments: list[Fragment] = self._build_fragments()
        params = [[f.master for f in self.fragments if f.group == g] for g in (0, 1)]
        groups = [{"params": params[0], "weight_decay": weight_decay}, {"params": params[1], "weight_decay": 0.0}]
        on_cuda = any(f.master.is_cuda for f in self.fragments)
        impl = {}
        if (on_cuda if fused is None else fused):
            impl["fused"] = True
        elif foreach is not None:
            impl["foreach"] = foreach
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl)
        self._init_state()

    # ------------------------------------------------------------------ construction
    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for m in self.modules for n, p in m.named_parameters() if p.requires_grad]

    def _build_fragments(self) -> list[Fragment]:
        out = []
        for name, p in self._named_params():
            if not p.is_contiguous():
                raise ValueError(f"parameter {name} is not contiguous; call .contiguous() on it before building the optimizer")
            master, copy = make_master(p.data.view(-1), self.master_weights)
            out.append(Fragment(name, p, 0, p.numel(), master, copy, int(self.no_weight_decay(name, p))))
        return out

    def _init_state(self) -> None:
        """Allocate AdamW state up front (what its first step would), so it can be loaded into."""
        for group in self.optimizer.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            for m in group["params"]:
                step_dtype = torch.float32 if on_device or torch.get_default_dtype() != torch.float64 else torch.float64
                self.optimizer.state[m] = {
                    "step": torch.zeros((), dtype=step_dtype, device=m.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(m, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(m, memory_format=torch.preserve_format)}

    # ------------------------------------------------------------------ torch.optim-like surface
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def num_steps(self) -> int:
        """Optimizer steps applied (skipped ones not counted). After fused steps this reads the
        device's skip count (a host sync): read it when saving, not every step."""
        if self._device_steps:
            skipped = int(read_scalars([self._device_skips])[0])
            self._num_steps += self._device_steps - skipped
            self._device_steps = 0
            self._device_skips.zero_()
        return self._num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps, self._device_steps = int(value), 0
        if self._device_skips is not None:
            self._device_skips.zero_()

    @property
    def fused(self) -> bool:
        """True when AdamW is torch's fused kernel: then ``step()`` runs without host syncs (bf16/fp32)."""
        return bool(self.optimizer.param_groups and self.optimizer.param_groups[0].get("fused"))

    @property
    def loss_scale(self) -> Optional[float]:
        return self.loss_scaler.scale if self.loss_scaler is not None else None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (multiplied by the loss scale for fp16)."""
        return self.loss_scaler.scale_loss(loss) if self.loss_scaler is not None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients: DDP grad buffers are zeroed, plain ``.grad``s dropped."""
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        for f in self.fragments:
            f.param.grad = None
            f.master.grad = None

    # ------------------------------------------------------------------ groups
    def _dp_groups(self) -> list[ProcessGroup]:
        return [b.dp_group for ddp in self.ddps for b in ddp.grad_buffers]

    def _found_inf_groups(self) -> list[ProcessGroup]:
        return list(self.model_parallel_groups) + self._dp_groups()

    def _norm_sets(self) -> list[tuple[list[Fragment], list[ProcessGroup]]]:
        """(fragments, groups to sum over): replicated masters are identical across DP, so no DP group;
        split experts differ across EP ranks, so theirs is summed over EP too."""
        if self.expert_parallel_group is None:
            return [(self.fragments, list(self.model_parallel_groups))]
        from megacore.distributed.ddp import is_expert_param

        dense = [f for f in self.fragments if not is_expert_param(f.param)]
        expert = [f for f in self.fragments if is_expert_param(f.param)]
        return [(dense, list(self.model_parallel_groups)), (expert, self._expert_norm_groups())]

    def _expert_norm_groups(self) -> list[ProcessGroup]:
        """What split experts' norm is summed over: PP (the model-parallel groups but TP), EP, ETP."""
        groups = [g for g in self.model_parallel_groups if g is not self.tp_group] + [self.expert_parallel_group]
        return groups + ([self.expert_tp_group] if self.expert_tp_group is not None else [])

    def _norm_tp_group(self, param) -> ProcessGroup:
        """The TP group ``counted_grads`` counts ``param`` over: split experts are held by every
        rank that counts them (ETP shards are described by their layout)."""
        if self.expert_parallel_group is None:
            return self.tp_group
        from megacore.distributed.ddp import is_expert_param

        return self.expert_tp_group if is_expert_param(param) else self.tp_group

    # ------------------------------------------------------------------ step
    def _prepare_grads(self) -> list[torch.Tensor]:
        grads = []
        for f in self.fragments:
            g = f.grad_view()
            if g is not None and g.dtype != f.master.dtype:
                g = g.to(f.master.dtype)
            f.master.grad = g
            if g is not None:
                grads.append(g)
        return grads

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the prepared master grads (each unique element counted once)."""
        device = self.fragments[0].master.device if self.fragments else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=device)
        for frags, groups in self._norm_sets():
            # Each fragment is the flat range [start, end) of its param: counted_grads keeps the
            # parts this rank owns (TP-replicated params on TP rank 0, replicated rows on their owner).
            grads = [g for f in frags
                     for g in counted_grads(f.param, f.master.grad, f.start, self._norm_tp_group(f.param),
                                            self.is_tp_replicated)]
            part = local_norm_power(grads, 2.0, device)
            if active_groups(groups):
                part = all_reduce_over(part.to(comm_device(device)), groups).to(device)
            total = total + part
        return total.sqrt()

    @torch.no_grad()
    def step(self, skip: Optional[torch.Tensor] = None) -> StepInfo:
        """One optimizer step; returns a :class:`StepInfo` (possibly not read yet, see there).

        ``skip``: an optional 0-dim/1-element tensor, non-zero to skip this step whatever the
        gradients (the trainer's divergence policy: a non-finite or spiking loss); it must hold
        the same value on every rank. It joins the non-finite-norm decision: inside the fused
        kernel (not read), or read with the norm on the non-fused path (one copy for both).

        Finishes the DDP gradient reduction first if the training loop has not (a no-op otherwise).
        Host syncs: none with fused AdamW in bf16/fp32; fp16 reads its overflow flag; the
        non-fused path reads the grad norm (see the module docstring).
        """
        for ddp in self.ddps:
            ddp.finish_grad_sync()
        grads = self._prepare_grads()
        if self.loss_scaler is not None:
            # The one sync of an fp16 step: the dynamic scaler decides its next scale on the host.
            found_inf = self.loss_scaler.unscale_and_check_(grads, self._found_inf_groups())
            self.loss_scaler.update(found_inf)
            if found_inf:
                self._drop_master_grads()
                return StepInfo(True, None, self.loss_scale)
        norm = self.grad_norm()
        if self.fused:
            return self._fused_step(norm, skip)
        norm_value, skip_value = read_scalars([norm, 0.0 if skip is None else skip])
        if not math.isfinite(norm_value) or skip_value:  # same values on every rank, so every rank skips
            self._drop_master_grads()
            return StepInfo(True, norm_value, self.loss_scale)
        if self.clip_grad > 0:
            scale_grads_(grads, self.clip_grad, norm)
        self.optimizer.step()
        self.num_steps += 1
        self._publish_update()
        return StepInfo(False, norm_value, self.loss_scale)

    def _fused_step(self, norm: torch.Tensor, skip: Optional[torch.Tensor] = None) -> StepInfo:
        """Clip and skip inside torch's fused AdamW kernel: no host sync (module docstring).

        Same decisions as the non-fused path: a non-finite norm skips the step (params, moments
        and AdamW's step counter unchanged); otherwise gradients are multiplied by
        ``min(1, clip / (norm + 1e-6))``, here as a division by its inverse (equal up to rounding).
        """
        norm = norm.float()
        finite = torch.isfinite(norm)
        found_inf = (~finite).float()           # torch's kernel skips when found_inf == 1.0 exactly
        if skip is not None:                    # the caller's veto, on the device: 1.0 or 0.0 as well
            found_inf = torch.maximum(found_inf, (skip.reshape(()) != 0).to(found_inf.device, torch.float32))
        grad_scale = None
        if self.clip_grad > 0:
            grad_scale = ((norm + 1e-6) / self.clip_grad).clamp(min=1.0)
            grad_scale = torch.where(finite, grad_scale, torch.ones_like(grad_scale))
        self.optimizer.grad_scale, self.optimizer.found_inf = grad_scale, found_inf
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = self.optimizer.found_inf = None
        if self._device_skips is None:
            self._device_skips = torch.zeros((), dtype=torch.float64, device=found_inf.device)
        self._device_skips.add_(found_inf)
        self._device_steps += 1
        self._publish_update()                  # unchanged masters when skipped: a harmless copy
        return StepInfo(found_inf, norm, self.loss_scale)

    def _publish_update(self) -> None:
        """After AdamW stepped the masters: round them into the params, drop the master grads, and
        let a subclass follow up (the distributed optimizer's param all-gather)."""
        self._copy_masters_to_params()
        self._drop_master_grads()
        self._after_step()

    def _drop_master_grads(self) -> None:
        for f in self.fragments:
            f.master.grad = None

    def _copy_masters_to_params(self) -> None:
        copies = [f for f in self.fragments if f.has_master_copy]
        if copies:
            dst, src = [f.model_view() for f in copies], [f.master for f in copies]
            try:
                torch._foreach_copy_(dst, src)
            except (RuntimeError, TypeError):
                for d, s in zip(dst, src):
                    d.copy_(s)

    def _after_step(self) -> None:
        pass

    @torch.no_grad()
    def reload_masters_from_params(self) -> None:
        """Refresh fp32 masters from the model weights (after loading weights into the model)."""
        for f in self.fragments:
            if f.has_master_copy:
                f.master.copy_(f.model_view())

    def state_bytes(self) -> int:
        """Bytes of optimizer-owned tensors on this rank: fp32 master copies + AdamW moments."""
        n = sum(f.master.numel() * f.master.element_size() for f in self.fragments if f.has_master_copy)
        for st in self.optimizer.state.values():
            n += sum(st[k].numel() * st[k].element_size() for k in MOMENT_NAMES if k in st)
        return n

    # ------------------------------------------------------------------ state
    def _hyperparams(self) -> list[dict]:
        return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                for g in self.optimizer.param_groups]

    def checkpoint_entries(self) -> list[StateEntry]:
        """Live tensors of every state of every fragment, with flat offsets into the local parameter."""
        out = []
        for f in self.fragments:
            if f.has_master_copy:
                out.append(StateEntry(f.param, "master", f.master, f.start))
            st = self.optimizer.state[f.master]
            out += [StateEntry(f.param, k, st[k], f.start) for k in MOMENT_NAMES]
        return out

    def checkpoint_common(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.num_steps, "param_groups": self._hyperparams(),
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None}

    def load_checkpoint_common(self, common: dict) -> None:
        self.num_steps = int(common.get("step", 0))
        for st in self.optimizer.state.values():
            st["step"].fill_(self.num_steps)
        for group, saved in zip(self.optimizer.param_groups, common.get("param_groups") or []):
            for k, v in saved.items():  # hyperparameters only: the implementation follows this machine
                if k in group and k != "params" and k not in _IMPLEMENTATION_KEYS:
                    group[k] = tuple(v) if isinstance(group[k], tuple) else v
        if self.loss_scaler is not None and common.get("loss_scaler"):
            self.loss_scaler.load_state_dict(common["loss_scaler"])

    def state_dict(self) -> dict:
        """Plain tensors + metadata: this rank's pieces of every parameter's optimizer state.

        ``shards[i]``: ``name`` (parameter name in the unwrapped model), ``shape`` (local param shape),
        ``start``/``end`` (flat element range of the parameter this piece covers), ``group``, and the
        tensors ``exp_avg``, ``exp_avg_sq`` and ``master`` (fp32 copy, or None when the master is the
        weight itself). Tensors are live storage: clone them before stepping if you save asynchronously.
        """
        shards = []
        for f in self.fragments:
            st = self.optimizer.state[f.master]
            shards.append({"name": f.name, "shape": list(f.param.shape), "start": f.start, "end": f.end,
                           "group": f.group, "master": f.master if f.has_master_copy else None,
                           "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]})
        sd = self.checkpoint_common()
        sd.update({"kind": type(self).__name__, "shards": shards})
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load pieces saved by any layout: each local fragment is filled from the saved pieces of the
        same parameter that overlap it (e.g. all ranks' shards of a DP=4 run, or one full piece).
        Missing fp32 masters are taken from the current model weights (load those first)."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state format {state_dict.get('format')!r} is not {STATE_FORMAT!r}; "
                             "pass a dict produced by MixedPrecisionOptimizer/DistributedOptimizer.state_dict()")
        by_name: dict[str, list[dict]] = {}
        for s in state_dict["shards"]:
            by_name.setdefault(s["name"], []).append(s)
        for f in self.fragments:
            st = self.optimizer.state[f.master]
            covered = torch.zeros(f.end - f.start, dtype=torch.bool)
            has_master = torch.zeros_like(covered)
            for s in by_name.get(f.name, []):
                if list(s["shape"]) != list(f.param.shape):
                    raise ValueError(f"saved optimizer state of {f.name} is for shape {s['shape']}, the parameter is "
                                     f"{list(f.param.shape)}; load with the same tensor-parallel layout")
                a, z = max(f.start, s["start"]), min(f.end, s["end"])
                if a >= z:
                    continue
                dst, src = slice(a - f.start, z - f.start), slice(a - s["start"], z - s["start"])
                for k in MOMENT_NAMES:
                    st[k][dst].copy_(s[k][src])
                if f.has_master_copy and s.get("master") is not None:
                    f.master[dst].copy_(s["master"][src])
                    has_master[dst] = True
                covered[dst] = True
            if not bool(covered.all()):
                missing = int((~covered).sum())
                raise ValueError(f"the optimizer state dict does not cover {missing} of {covered.numel()} elements of "
                                 f"{f.name}[{f.start}:{f.end}]; pass the shards of every rank of the saved run")
            if f.has_master_copy and not bool(has_master.all()):
                f.master[~has_master.to(f.master.device)] = f.model_view().float()[~has_master.to(f.master.device)]
        self.load_checkpoint_common(state_dict)
