"""Data parallelism with contiguous gradient buffers and reduction overlapped with backward.

Loss-normalization contract (what makes gradients layout-invariant)
-------------------------------------------------------------------
The training loss of one optimizer step is the mean over every labelled token of the GLOBAL batch:

    L = (1 / N_global) * sum over all DP ranks, all micro-batches, all labelled tokens t of loss_t

where ``N_global`` is the number of labelled tokens in the whole global batch (all micro-batches on
all data-parallel ranks). Each micro-batch's backward therefore runs on
``sum(per-token loss of the micro-batch) / N_global`` and this module SUMS gradients over the
data-parallel group (never averages). Summing the per-micro-batch gradients (gradient
accumulation) and then summing across DP ranks gives exactly dL/dθ, whatever the micro-batch size,
the number of micro-batches or the DP size, so a DP=4 run reproduces the DP=1 run. (Averaging over
DP would be right only when every rank holds the same number of labelled tokens.)

How a step runs
---------------
::

    ddp = DistributedDataParallel(model, dp_group)          # params get .main_grad views
    opt = MixedPrecisionOptimizer(ddp, ...) / DistributedOptimizer(ddp, ...)
    for step:
        ddp.zero_grad_buffer()                              # or opt.zero_grad()
        for i, mb in enumerate(micro_batches):
            with ddp.no_sync() if i < len(micro_batches) - 1 else nullcontext():
                (model_loss_sum(mb) / n_global_tokens).backward()
        ddp.finish_grad_sync()                              # wait for the bucket reductions
        opt.step()

A ``post_accumulate_grad`` hook on every parameter adds ``param.grad`` into ``param.main_grad``
(fp32 by default for bf16/fp16 parameters) and frees ``param.grad`` at once, so gradients never
accumulate in low precision and only one gradient copy lives per parameter. During the last
micro-batch (outside ``no_sync``) the hook also marks the parameter ready; when every parameter of a
bucket is ready the bucket's async all-reduce (or reduce-scatter into the local shard, with the
distributed optimizer) launches immediately, overlapping communication with the rest of backward.

With ``use_distributed_optimizer=True`` the weights live in a flat parameter buffer; after the
optimizer updates its shard, ``start_param_sync()`` all-gathers the buckets. With
``overlap_param_gather=True`` those all-gathers are asynchronous and a forward pre-hook on each
module waits only for the buckets holding that module's own parameters, so the gather overlaps with
the next forward. Parameters read outside their own module's forward (GPTModel applies
``output_layer.weight`` with ``F.linear`` from the parent) are detected on the first forward: their
buckets are then gathered first and waited for at the top of ``forward()``. Call the model through
this wrapper (not ``.module``) so that this works.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megacore.distributed.comm import ProcessGroup, global_rank_of, group_size, is_distributed
from megacore.distributed.grad_buffer import GradBuffer
from megacore.sharding import peek_meta

def is_expert_param(p: nn.Parameter) -> bool:
    """Default predicate for expert (MoE) parameters, reduced over ``expert_dp_group`` instead."""
    return peek_meta(p).expert_slice is not None


class DistributedDataParallel(nn.Module):
    """Wrap ``module`` for data parallelism over ``dp_group`` (see the module docstring).

    Args:
        module: the model (already materialized on its device, already TP/PP-sharded).
        dp_group: data-parallel group (``None``: WORLD when distributed, else no communication).
        bucket_size_mb: target bucket size in MB of gradient storage (``None``/0: one bucket per buffer).
        overlap_grad_reduce: launch each bucket's reduction from the backward hook as soon as it fills;
            otherwise all reductions launch in ``finish_grad_sync()``.
        use_distributed_optimizer: reduce-scatter gradients into per-rank shards and keep the weights in
            a flat buffer for the post-step all-gather (ZeRO-1/2, used by ``DistributedOptimizer``).
        grad_reduce_dtype: dtype on the wire (default fp32; bf16 halves traffic at some precision
            cost; None: the ``main_grad`` dtype).
        grad_dtype: dtype of ``main_grad`` for bf16/fp16 parameters: fp32 by default, or e.g.
            ``torch.bfloat16`` to accumulate in the parameter dtype (half the grad memory). fp32
            parameters always accumulate in fp32.
        overlap_param_gather: with the distributed optimizer, make the post-step all-gather async and
            wait per module in a forward pre-hook.
        expert_dp_group: group over which parameters with ``is_expert(p)`` are reduced (default dp_group).
    """

    def __init__(self, module: nn.Module, dp_group: ProcessGroup = None, bucket_size_mb: Optional[float] = 25.0,
                 overlap_grad_reduce: bool = True, use_distributed_optimizer: bool = False,
                 grad_reduce_dtype: Optional[torch.dtype] = torch.float32, grad_dtype: Optional[torch.dtype] = None,
                 overlap_param_gather: bool = False, expert_dp_group: ProcessGroup = None,
                 is_expert: Callable[[nn.Parameter], bool] = is_expert_param):
        super().__init__()
        if bucket_size_mb is not None and bucket_size_mb < 0:
            raise ValueError(f"bucket_size_mb={bucket_size_mb} must be >= 0 (0 or None: one bucket per buffer)")
        self.module = module
        if dp_group is None and is_distributed():
            dp_group = dist.group.WORLD
        self.dp_group = dp_group
        self.expert_dp_group = expert_dp_group if expert_dp_group is not None else dp_group
        self.dp_size = group_size(dp_group)
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather and use_distributed_optimizer
        self.require_grad_sync = True
        self._tp_sum_pending = False  # a gradient arrived since the last finish_grad_sync
        self._has_finalize_params = any(getattr(m, "_megacore_tp_sync_mode", None) == "finalize"
                                        for m in module.modules())

        # One buffer per (param dtype, grad dtype, group kind); order of first appearance.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("DistributedDataParallel got a module without trainable parameters")
        self.param_names: dict[int, str] = {id(p): n for n, p in named}
        groups: dict[tuple, list[nn.Parameter]] = {}
        for _, p in named:
            gdt = torch.float32 if p.dtype == torch.float32 else (grad_dtype or torch.float32)
            key = (p.dtype, gdt, bool(is_expert(p)))
            groups.setdefault(key, []).append(p)
        self.grad_buffers: list[GradBuffer] = []
        self._buffer_of: dict[int, GradBuffer] = {}
        for (_, gdt, expert), ps in groups.items():
            numel = None if not bucket_size_mb else int(bucket_size_mb * 2 ** 20 / torch.empty((), dtype=gdt).element_size())
            buf = GradBuffer(ps, grad_dtype=gdt, bucket_numel=numel,
                             dp_group=self.expert_dp_group if expert else dp_group, shard=use_distributed_optimizer,
                             reduce_dtype=grad_reduce_dtype or gdt)
            self.grad_buffers.append(buf)
            for p in ps:
                self._buffer_of[id(p)] = buf

        self._hook_handles = [p.register_post_accumulate_grad_hook(self._grad_hook) for _, p in named]
        self._param_gather_pending = False
        # Parameters read outside their own module's forward (e.g. an output weight applied with
        # F.linear by the parent) never trigger a pre-hook: the first forward learns which modules
        # ran, and from then on the buckets of the others are gathered first and waited for at the top
        # of forward(). Until learned, forward() waits for every bucket.
        self._owner: dict[int, int] = {}
        self._fired: set[int] = set()
        self._unhooked_buckets = None
        self._waits_for: dict[int, list[nn.Parameter]] = {}  # module id -> params its pre-hook waits for
        if self.overlap_param_gather:
            self._install_param_wait_hooks(module)

    # ------------------------------------------------------------------ forward / state
    def forward(self, *args, **kwargs):
        if self._param_gather_pending:
            if self._unhooked_buckets is None:
                self.finish_param_sync()
            else:
                for b in self._unhooked_buckets:
                    b.finish_param_sync()
        learn = self.overlap_param_gather and self._unhooked_buckets is None
        if learn:
            self._fired.clear()
        out = self.module(*args, **kwargs)
        if learn:
            buckets: dict[int, object] = {}
            for pid, owner in self._owner.items():
                if owner not in self._fired:
                    b = self._buffer_of[pid].param_to_bucket[pid]
                    buckets[id(b)] = b
            self._unhooked_buckets = list(buckets.values())
        return out

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (no ``module.`` prefix), so checkpoints are DDP-agnostic."""
        self.finish_param_sync()
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if assign:
            raise ValueError("load_state_dict(assign=True) would detach parameters from the flat buffers; "
                             "use assign=False (copies into the existing parameters)")
        self.finish_param_sync()
        return self.module.load_state_dict(state_dict, strict=strict)

    # ------------------------------------------------------------------ gradients
    def _grad_hook(self, param: nn.Parameter) -> None:
        buf = self._buffer_of[id(param)]
        if buf.synced:
            raise RuntimeError("a gradient arrived after finish_grad_sync() of this step; call "
                               "ddp.zero_grad_buffer() (or optimizer.zero_grad()) before the next backward")
        self._tp_sum_pending = True
        if getattr(param, "grad_added_to_main_grad", False):  # a fused kernel wrote into main_grad itself
            param.grad_added_to_main_grad = False           # (it must have used settled_main_grad first)
        elif param.grad is not None:
            buf.accumulate(param, param.grad)
        param.grad = None
        if self.require_grad_sync and self.overlap_grad_reduce:
            buf.mark_ready(param)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into ``main_grad`` (gradient-accumulation micro-batches)."""
        previous = self.require_grad_sync
        self.require_grad_sync = False
        try:
            yield
        finally:
            self.require_grad_sync = previous

    def start_grad_sync(self) -> None:
        """Launch every bucket reduction not launched yet (what the hooks do without overlap)."""
        for buf in self.grad_buffers:
            buf.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Launch any outstanding bucket reductions and wait for all of them.

        Afterwards ``main_grad`` holds the DP-summed gradient (with the distributed optimizer: only
        within this rank's shard of each bucket; the rest of the buffer holds partial sums).

        Then the tensor-parallel sums of parameters marked ``grad_sync="finalize"`` (sequence-parallel
        norm weights, replicated KV rows; ``megacore.parallel.finalize_grads_tp``) run once, in one
        coalesced all-reduce per group. Sums commute, so taking the TP sum after the DP sum gives the
        same gradient; waiting for the DP reduction first keeps the two from writing ``main_grad``
        concurrently.
        """
        for buf in self.grad_buffers:
            buf.finish_grad_sync()
        if self._tp_sum_pending:
            self._tp_sum_pending = False
            if self._has_finalize_params:
                from megacore.parallel.grad_sync import finalize_grads_tp

                finalize_grads_tp(self.module)

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (and drop any stray ``param.grad``) before a new step."""
        for buf in self.grad_buffers:
            buf.zero()
            for p in buf.params:
                p.grad = None

    # ------------------------------------------------------------------ parameters
    def start_param_sync(self, force_sync: bool = False) -> None:
        """All-gather the updated parameter shards (distributed optimizer only).

        Asynchronous when ``overlap_param_gather`` (waited for by forward pre-hooks) unless
        ``force_sync``.
        """
        if not self.use_distributed_optimizer:
            return
        self.finish_param_sync()  # never leave an older gather unwaited
        async_op = self.overlap_param_gather and not force_sync
        first = self._unhooked_buckets or []
        for b in first:  # needed at the very top of forward(): issue them first
            b.start_param_sync(async_op)
        skip = {id(b) for b in first}
        for buf in self.grad_buffers:
            for b in reversed(buf.buckets):  # then in forward order (buckets are in backward order)
                if id(b) not in skip:
                    b.start_param_sync(async_op)
        self._param_gather_pending = async_op

    def finish_param_sync(self) -> None:
        """Wait for every pending parameter all-gather."""
        if self._param_gather_pending:
            for buf in self.grad_buffers:
                buf.finish_param_sync()
            self._param_gather_pending = False

    def _install_param_wait_hooks(self, module: nn.Module) -> None:
        """Forward pre-hooks that wait for the all-gather of the parameters a module is about to use.

        A module compiled with ``Module.compile()`` (a TransformerLayer under ``compile=true``) is one
        unit: one hook, run outside the compiled graph (``torch.compiler.disable``; at the top of the
        layer, so the layer still compiles as one graph), waits for every parameter inside it. A hook
        on each submodule would run inside the compiled code and split the graph at every linear.
        Other modules wait for their own parameters.
        """
        covered: set[int] = set()
        units = [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        hook = torch.compiler.disable(self._wait_params_hook)
        for unit in units:
            params = [p for p in unit.parameters() if p.requires_grad and id(p) not in covered]
            if params:
                covered.update(id(p) for p in params)
                self._register_wait(unit, params, hook)
        for m in module.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in covered]
            if own:
                self._register_wait(m, own, self._wait_params_hook)

    def _register_wait(self, m: nn.Module, params: list, hook) -> None:
        for p in params:
            self._owner.setdefault(id(p), id(m))
        self._waits_for[id(m)] = params
        self._hook_handles.append(m.register_forward_pre_hook(hook))

    def _wait_params_hook(self, module: nn.Module, args) -> None:
        if self._unhooked_buckets is None:
            self._fired.add(id(module))
        if not self._param_gather_pending:
            return
        for p in self._waits_for.get(id(module), ()):
            buf = self._buffer_of.get(id(p))
            if buf is not None:
                buf.param_to_bucket[id(p)].finish_param_sync()

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Copy data-parallel rank 0's parameters to the other DP ranks (for non-deterministic inits)."""
        if self.dp_size == 1:
            return
        for buf in self.grad_buffers:
            src = global_rank_of(buf.dp_group, 0)
            for p in buf.params:
                dist.broadcast(p.data, src=src, group=buf.dp_group)

    def remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
