"""``Trainer``: builds everything a run needs from a ``RunConfig`` and runs the loop.

    cfg = load_run_config("configs/tiny_cpu.yaml", ["train.iters=50"]).validate()
    summary = Trainer(cfg).run()

One code path serves every layout. What the layout changes is declared, then applied:

1. ``megacore.parallel.initialize(**parallel.mesh_sizes())`` builds the groups of every axis of the
   ``parallel`` section (TP/PP/CP/DP and the expert folding EP/EDP; a no-op layout on one process),
   and the trainer checks that the groups have the sizes asked for;
2. ``megacore.pipeline.build_model_chunks`` builds this rank's pipeline stage(s) of the one-device
   ``GPTModel`` on meta, TP-shards them (``parallel.tensor``, ``sequence_parallel``) and fills
   every parameter from ``(train.seed, global name)``, so the seed defines the global model;
3. each chunk is wrapped in ``megacore.distributed.DistributedDataParallel`` over the
   data-parallel group (fp32 ``main_grad`` buffers, bucketed reduction overlapping backward), or in
   FSDP2 (``parallel.fsdp``);
4. ``MixedPrecisionOptimizer`` (replicated) or ``DistributedOptimizer`` (ZeRO-1/2,
   ``parallel.distributed_optimizer``) steps fp32 master weights with a global grad norm counted
   once across TP/PP/DP; fp16 adds a dynamic loss scaler;
5. ``megacore.pipeline.forward_backward`` runs the micro-batches (gradient accumulation, or a
   pipeline schedule when ``parallel.pipeline > 1``).

Loss normalization and data order: see ``megacore.training.contract``. The loss scale of fp16 is
folded into the token-count denominator (``loss * scale / N == loss / (N / scale)``), which keeps
every pipeline schedule unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megacore.config import ConfigError, RunConfig
from megacore.distributed.comm import comm_device
from megacore.training.compile import release_cuda_graphs
from megacore.training.flops import flops_per_token, peak_tflops, vision_flops_per_token
from megacore.precision.mixed import DTYPES
from megacore.training.contract import StepResult, StopFlag, TrainingError, check_device, resolve_device
from megacore.training.data_feed import DataFeed
from megacore.training.divergence import DivergenceGuard
from megacore.training.evaluation import evaluate
from megacore.training.lr_schedule import LRSchedule
from megacore.training.metrics import MetricsLogger
from megacore.training.profiling import Profiler
from megacore.training.sinks import open_sinks, require_sink_packages
from megacore.layers.moe import set_aux_loss_scale
from megacore.training.moe import aux_loss_sum, end_moe_step, moe_layers, num_moe_layers
from megacore.training.peers import describe_collective_failure
from megacore.training.layout_sums import count_over_dp, global_param_count, sum_over_layout, weights_finite
from megacore.training.pending_step import PendingStep, seconds_between, timing_mark
from megacore.training.run_dir import agree_run_dir, write_run_config
from megacore.training.step_record import step_record


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        from megacore.training.hf_bridge import HFBridge

        # model.from_hf: the model section (and tokenizer) come from the HF directory, before any key is read.
        self.hf = HFBridge(cfg, self._info)
        cfg.validate()  # before anything reads a key (precision.dtype, device); setup() adds the world size
        self.device = resolve_device(cfg)
        self.dtype = DTYPES[cfg.precision.dtype]
        self.stop = StopFlag()
        self.step = 0
        self.active_step = 0  # 1-based step being queued; failure messages name it
        self.state = None
        self.checkpoints = None
        self.profiler = Profiler(cfg.profile, cfg.log.dir, self.rank, self.device, self._info)

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        cfg.validate(self.world_size)  # every layout x feature x model check: megacore.config.support
        check_device(cfg, self.device)
        require_sink_packages(cfg.log)  # a missing wandb/tensorboard fails here, before any work
        self._init_parallel()
        self._lock_checkpoint_dir()
        self.data = DataFeed(cfg, self.state, self.device, self.rank, self.world_size, self._info)
        self.data.build()
        cfg.validate(self.world_size)  # again: the tokenizer may have changed model.vocab_size
        self.chunks = self.build_model()
        self.moe_layers = moe_layers(self.chunks)  # empty for a dense model
        for chunk in self.chunks:
            # Each micro-batch's load-balancing loss counts 1/(micro-batches x DP ranks): the objective
            # holds their mean over the global batch, like the LM loss.
            set_aux_loss_scale(chunk, 1.0 / (len(self.data.micro_slices()) * self.dp_size))
        self.optimizer, self.loss_scaler = self.build_optimizer()
        self.schedule = LRSchedule(cfg.train)
        scaler = self.loss_scaler  # an fp16 scale at its floor (or a constant one) cannot back off further
        self.guard = DivergenceGuard(cfg.train.max_skipped_steps, cfg.train.loss_spike_factor,
                                     cfg.train.loss_spike_window,
                                     getattr(scaler, "min_scale", getattr(scaler, "scale", None)))
        self.flops_per_token = flops_per_token(cfg.model)
        if cfg.vision.enabled:
            self.flops_per_token += vision_flops_per_token(cfg.vision, cfg.model.hidden_size, cfg.model.seq_length)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_tflops = peak_tflops(name)
        n_params = global_param_count(self.chunks, self.state, self.world_size, self.device)
        p = cfg.parallel
        from megacore.parallel.topology import describe_layout

        pattern = f" ({cfg.model.layer_pattern})" if cfg.model.layer_pattern else ""
        self._info(f"model: {n_params / 1e6:.1f}M parameters, {cfg.model.num_layers} layers{pattern}, hidden "
                   f"{cfg.model.hidden_size}, seq {cfg.model.seq_length}, device {name}, dtype {cfg.precision.dtype}")
        # Read from the live groups, not the config: the line says what actually runs.
        self._info(f"layout: {describe_layout(self.state)}{' (sequence parallel)' if p.sequence_parallel else ''}"
                   f"; optimizer "
                   f"{'FSDP2' if p.fsdp else 'distributed (ZeRO-1/2)' if p.distributed_optimizer else 'replicated'}; "
                   f"{len(self.data.micro_slices())} micro-batches of {cfg.train.micro_batch_size} per step")
        self._resume()
        # A new run never writes over an earlier one's record (megacore.training.run_dir).
        cfg.log.dir = agree_run_dir(cfg.log.dir, self.step > 0, self.rank, self._info)
        self.profiler.dir = os.path.join(cfg.log.dir, "profile")
        if self.rank == 0:
            write_run_config(cfg, name, self.world_size, self.step)
        sinks = open_sinks(cfg, self.step if self.step > 0 else None) if self.rank == 0 else []
        self.metrics = MetricsLogger(sinks, enabled=self.rank == 0, total_iters=cfg.train.iters)
        self._info(self.metrics.outputs(cfg.checkpoint.dir, self.profiler.output_dir))

    def _init_parallel(self) -> None:
        """The process groups of the whole ``parallel`` section, built in one call, then checked:
        every axis asked for must be the one the groups have (a size dropped on the way would
        otherwise run a different layout than the config and the log claim)."""
        from megacore import parallel
        from megacore.parallel.topology import layout_mismatches

        sizes = self.cfg.parallel.mesh_sizes()
        if self.world_size > 1:
            self.state = parallel.initialize(**sizes, timeout_s=self.cfg.parallel.timeout_s)
        else:
            self.state = parallel.get_state()
        problems = layout_mismatches(self.state, sizes)
        if problems:
            raise TrainingError("the process groups do not match the parallel config: " + "; ".join(
                f"parallel.{p}" for p in problems) + f" (world size {self.world_size}); this is a bug in how "
                "the layout was built, not in the config")
        # Dropout: identical where a tensor is replicated, different across TP shards.
        parallel.model_parallel_seed(self.cfg.train.seed)
        self.dp_size = self.state.dp_size
        self.dp_rank = self.state.dp_rank

    def build_model(self) -> list[torch.nn.Module]:
        """This rank's model chunks, wrapped for data parallelism (the composition root, ``megacore.compose``)."""
        from megacore.compose import build_run_model

        return build_run_model(self.cfg, self.state, self.device, self.dtype, self._info)

    def build_optimizer(self):
        from megacore.compose import build_optimizer

        return build_optimizer(self.cfg, self.chunks, self.state, self.dtype)

    def _lock_checkpoint_dir(self) -> None:
        """Before any work: ``checkpoint.dir`` belongs to this run (rank 0 holds its lock until the
        end), or the run stops here, naming the run that holds it."""
        from megacore.checkpoint import CheckpointManager
        from megacore.checkpoint.lock import DirectoryInUse

        self.checkpoints = CheckpointManager(self.cfg.checkpoint, log=self._info)
        try:
            self.checkpoints.lock()
        except DirectoryInUse as e:
            raise ConfigError(str(e)) from None

    def _resume(self) -> None:
        if self.checkpoints is None:
            self._lock_checkpoint_dir()
        if self.cfg.parallel.fsdp:  # no checkpoint to resume: validate refuses checkpointing with FSDP2
            return
        result = self.checkpoints.resume(self.chunks, self.optimizer, self.loss_scaler)
        if result is not None:
            self.step = result.step
            self.data.resume_at(result, self.step)
            if self.step >= self.cfg.train.iters:
                self._info(f"the checkpoint is at step {self.step} >= train.iters={self.cfg.train.iters}: "
                           "nothing left to train (raise train.iters to continue)")

    def _info(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[megacore] {msg}", flush=True)

    def sum_over_layout(self, local: torch.Tensor, *extra) -> torch.Tensor:
        """``megacore.training.layout_sums.sum_over_layout`` over this run's layout."""
        return sum_over_layout(local, *extra, state=self.state, world_size=self.world_size, device=self.device)

    @staticmethod
    def _no_tokens_message(step: int) -> str:
        return f"step {step + 1}: the global batch has no labelled tokens; check data.eod_mask_loss and the data"

    # ------------------------------------------------------------------------------- step
    def train_step(self, step: int) -> PendingStep:
        """Queue training step ``step`` (0-based); returns it unread (:class:`PendingStep`).

        Host syncs on CUDA: none in bf16/fp32 with the fused AdamW of ``MixedPrecisionOptimizer``
        / ``DistributedOptimizer`` (the labelled tokens are counted on the host, all-reduced on the
        device and divided by as a tensor; the optimizer clips and skips inside its kernel; the loss
        and the stop flag leave in one all-reduce nobody waits for here). fp16 keeps one: the loss
        scaler reads its overflow flag. Whatever is left is read by ``PendingStep.resolve``.
        """
        from megacore.pipeline.schedules import forward_backward
        from megacore.optim.step_info import StepInfo

        micro, local_tokens = self.data.micro_batches(self.data.train_ds, step, self.data.first_sample(step))
        num_tokens = count_over_dp(local_tokens, self.state, self.world_size, self.device)
        if not isinstance(num_tokens, torch.Tensor) and num_tokens == 0:  # known on the host: fail now
            raise TrainingError(self._no_tokens_message(step))
        self.optimizer.zero_grad()
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        self.schedule.apply(self.optimizer, step)
        denominator = num_tokens if scale == 1.0 else num_tokens / scale
        with self._fp8_weight_cache(len(micro)):
            local = forward_backward(self.chunks, micro, denominator, pp_group=self.state.pp_group,
                                     schedule=self.cfg.parallel.pipeline_schedule,
                                     embedding_group=self.state.embedding_group)
        stop_vote = 1.0 if self.stop.requested else 0.0
        aux = aux_loss_sum(self.moe_layers, self.device)
        if aux is None and num_moe_layers(self.cfg.model):  # a stage without MoE layers adds 0 to the same sum
            aux = torch.zeros((), device=self.device)
        mtp = self._mtp_terms()
        # The global loss is summed before the optimizer step, so the divergence policy can veto
        # the step on the device (a non-finite loss, a spike): megacore.training.divergence.
        loss_votes = self.sum_over_layout(local, stop_vote, *([aux] if aux is not None else []), *mtp)
        threshold = self.guard.spike_threshold(step)
        skip, spike = self.guard.veto(loss_votes[0] / scale, threshold)
        if self.cfg.parallel.fsdp:  # torch's AdamW cannot skip: a non-finite step stops the run (_finish_step)
            info = StepInfo(False, self._fsdp_optimizer_step(), None)
        else:
            info = self.optimizer.step(skip=skip)
        pending = PendingStep(step, loss_votes, num_tokens, info, scale)
        pending.spike, pending.spike_threshold = spike, threshold
        pending.moe_metrics = end_moe_step(self.moe_layers, self.cfg.model, info.skipped_flag, comm_device(self.device))
        if aux is not None:  # the world sum counts every MoE layer once per DP replica
            pending.aux_denominator = num_moe_layers(self.cfg.model) * self.dp_size
        pending.mtp_depths = len(mtp)
        return pending

    def _mtp_terms(self) -> list:
        """Multi-token prediction: each depth's term of this step's objective (scaled by the loss scale,
        like the loss; ``megacore.layers.mtp``), as device scalars riding in the loss all-reduce
        (zeros on ranks without the MTP block, and on TP ranks other than 0, which hold the same
        value); [] without MTP."""
        from megacore.layers.mtp import pop_mtp_losses
        from megacore.pipeline.tied import unwrap

        depths = self.cfg.model.mtp_num_layers
        if not depths:
            return []
        found = [t for t in (pop_mtp_losses(unwrap(c)) for c in self.chunks) if t is not None]
        terms = found[0] if found else torch.zeros(depths, device=self.device)
        if self.world_size > 1 and self.state.tp_rank != 0:
            terms = torch.zeros_like(terms)
        return list(terms.unbind())

    def _fp8_weight_cache(self, num_micro: int):
        """With fp8 and several micro-batches per step: quantize every weight once for the whole
        step (``megacore.precision.fp8.fp8_weight_cache``; bit-identical, saves the per-pass casts).
        The distributed optimizer's parameter all-gather must land first. Not under FSDP, whose
        weights exist whole only inside each layer's forward."""
        if self.cfg.precision.fp8 is None or self.cfg.parallel.fsdp or num_micro < 2:
            return contextlib.nullcontext()
        from megacore.distributed import DistributedDataParallel
        from megacore.precision.fp8 import fp8_weight_cache

        for chunk in self.chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.finish_param_sync()
        return fp8_weight_cache(self.chunks)

    def _fsdp_optimizer_step(self) -> torch.Tensor:
        """Clip (torch's clip works on FSDP2's DTensor grads) and step; returns the grad norm, unread."""
        clip = self.cfg.train.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(self.chunks[0].parameters(), clip if clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        return norm.detach()

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Mean validation loss at ``step`` (``megacore.training.evaluation``)."""
        return evaluate(self.chunks, self.data, self.cfg, self.state, step, self.sum_over_layout,
                        lambda n: count_over_dp(n, self.state, self.world_size, self.device))

    # ------------------------------------------------------------------------------- loop
    def _extra(self) -> dict:
        return {"consumed_samples": self.data.first_sample(self.step), "run_config": self.cfg.to_dict(),
                **self.hf.checkpoint_extra()}

    def _save(self, final: bool = False) -> None:
        """Write the checkpoint of ``self.step`` (``final``: the one at the end or on a stop, then wait
        for every pending write) -- unless a weight is NaN/inf: then nothing is written, the pending
        writes of earlier (checked) steps still commit, and the run stops with a TrainingError, so a
        diverged model never becomes the checkpoint a resume picks. An interval save is also left out
        while the last steps were skipped (``DivergenceGuard.streak``): their weights are the ones
        that led to the skips; the next interval saves again once a step is applied."""
        ckpt = self.checkpoints
        if not final and self.guard.streak:
            self._info(f"checkpoint of step {self.step} not written: the last {len(self.guard.streak)} step(s) were "
                       f"skipped ({self.guard.streak[-1][1]})")
            return
        writes = bool(ckpt.cfg.dir) and (not final or (ckpt.cfg.save_on_exit and self.step > 0
                                                       and ckpt.last_saved_step != self.step))
        if writes and not weights_finite(self.chunks, self.world_size, self.device):
            if ckpt.last_saved_step is not None:  # finish() saves only a step it has not saved: wait, save nothing
                ckpt.finish(ckpt.last_saved_step, self.chunks, self.optimizer, self.loss_scaler, extra=self._extra())
            kept = (f"the newest checkpoint is the one of step {ckpt.last_saved_step}"
                    if ckpt.last_saved_step else "no checkpoint was written")
            raise TrainingError(
                f"the weights hold NaN or inf after step {self.step}, so its checkpoint was not written; {kept}. "
                f"Every applied step had a finite loss and grad norm, so an update itself overflowed (lr "
                f"{self.schedule(max(self.step - 1, 0)):.3e}): try a lower train.lr, a longer train.warmup_iters "
                "or train.clip_grad=1.0")
        if final:
            ckpt.finish(self.step, self.chunks, self.optimizer, self.loss_scaler, extra=self._extra())
        else:
            ckpt.save(self.step, self.chunks, self.optimizer, self.loss_scaler, extra=self._extra())
            if self.hf.export_each_save:
                self.hf.export(self.chunks, self.step, self._extra())

    def run(self) -> dict:
        self.stop.install()
        try:
            with self.profiler:  # a trace over profile.start_step..end_step; CUDA memory history
                self.setup()
                result = self._loop()
            if self.world_size > 1:
                # The last step's parameter all-gather (distributed optimizer) may still be in flight:
                # a gloo worker thread that still holds it when the groups are destroyed aborts the
                # process at exit. Then no rank tears its groups down while a peer may still use them.
                self._finish_pending_collectives()
                dist.barrier()
            return result
        except RuntimeError as e:
            # A collective that timed out or lost a peer: say which rank and step, in one line.
            message = None if isinstance(e, TrainingError) or self.world_size == 1 else describe_collective_failure(
                e, self.rank, self.active_step, self.cfg.parallel.timeout_s)
            if message is None:
                raise
            raise TrainingError(message) from e
        finally:
            if self.checkpoints is not None:
                self.checkpoints.close()
            self.stop.restore()
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.close()
            if self.world_size > 1 and self.state is not None and self.state.initialized:
                from megacore import parallel

                release_cuda_graphs(self.cfg, self.device)
                parallel.destroy()

    def _finish_pending_collectives(self) -> None:
        from megacore.distributed import DistributedDataParallel

        for chunk in self.chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.finish_param_sync()

    def _loop(self) -> dict:
        """Run steps until ``train.iters`` or an agreed stop request.

        The host runs one step ahead of the numbers: step ``k + 1`` is queued before step ``k`` is
        read (``PendingStep.resolve``: the step's one host sync in bf16/fp32, which waits for the
        GPU to finish step ``k`` while step ``k + 1`` is already queued behind it), then step ``k``
        is checked (no labelled tokens, non-finite loss: raise, naming step ``k``), logged, and its
        stop votes decide whether to stop. A stop agreed at step ``k`` therefore ends the run after
        step ``k + 1``, on every rank. Before an eval, a checkpoint save, a stop or the end, the
        queued step is read first (so nothing is saved after a bad loss).

        ``step_time_s`` is the time from the end of the previous step (or of an eval/save) to the
        end of this one on the timeline that runs the step: the GPU's (CUDA events recorded when a
        step is queued, read once the step is read, so timing needs no sync), the host's on CPU.
        It includes the GPU idling while the host prepares a step, so it is the wall time per step
        in steady state whether the GPU or the host is the bottleneck.
        """
        t = self.cfg.train
        first_loss = last_loss = None
        start = time.time()
        start_step = self.step
        self.metrics.reset_timer(self.step)
        self._mark = timing_mark(self.device)
        pending: Optional[PendingStep] = None
        stopped = False

        def finish(p: PendingStep) -> None:
            nonlocal first_loss, last_loss, stopped
            result, stop = self._finish_step(p)
            first_loss = result.loss if first_loss is None else first_loss
            last_loss = result.loss
            stopped = stopped or stop

        while self.step < t.iters:
            try:
                with self.profiler.step(self.step + 1):
                    queued = self._queue_step(self.step)
            except TrainingError:
                if pending is not None:  # report the earlier step first (it may be the cause)
                    finish(pending)
                raise
            if pending is not None:
                finish(pending)
            pending = queued
            self.step += 1
            evaluate = bool(t.eval_interval) and self.step % t.eval_interval == 0 and self.data.valid_ds is not None
            save = self.checkpoints.should_save(self.step)
            if pending.ready or stopped or evaluate or save or self.step >= t.iters:
                finish(pending)
                pending = None
            if evaluate:
                self.metrics.log_eval(self.step, self.evaluate(self.step))
            if save:
                self._save()
            elif self.checkpoints.cfg.dir and self.step % self.cfg.log.interval == 0:
                # Collective, and a host sync while an async save is in flight: every log interval.
                self.checkpoints.poll()
            if evaluate or save:
                self._mark = timing_mark(self.device)  # the next step's time excludes eval and saving
            if stopped:
                self._info(f"received {self.stop.signal_name or 'a stop signal'}: stopping cleanly after step {self.step}")
                break
        if not self.cfg.parallel.fsdp:
            self._save(final=True)
        if self.cfg.checkpoint.save_hf is not None:
            self.hf.export(self.chunks, self.step, self._extra())
        wall = time.time() - start
        self._info(f"done: {self.step - start_step} steps in {wall:.1f}s, first loss {first_loss:.4f}, last loss "
                   f"{last_loss:.4f}" if first_loss is not None else "done: no steps run")
        self._info(self.metrics.outputs(self.cfg.checkpoint.dir, self.profiler.output_dir))
        return {"steps": self.step, "first_loss": first_loss, "last_loss": last_loss, "wall_s": wall,
                "stopped_by_signal": stopped}

    def _queue_step(self, step: int) -> PendingStep:
        """``train_step`` plus its timing marks and the peak GPU memory allocated while queueing it
        (the allocator counts on the host, so this is the step's peak without waiting for the GPU)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        host_start = time.perf_counter()
        self.active_step = step + 1
        queued = self.train_step(step)
        if not isinstance(queued, PendingStep):  # a StepResult already read (e.g. a stand-in step)
            queued = PendingStep.of(step, queued)
        queued.host_s = time.perf_counter() - host_start
        if cuda:
            queued.mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        queued.start_mark, queued.end_mark = self._mark, timing_mark(self.device)
        self._mark = queued.end_mark
        return queued

    def _finish_step(self, p: PendingStep) -> tuple[StepResult, bool]:
        """Read step ``p`` (the host sync), check it, log it; returns (result, stop agreed).

        A skipped step is logged with its reason and the run stops once ``train.max_skipped_steps``
        steps in a row were skipped (``DivergenceGuard``). A non-finite loss or grad norm on a step
        that was applied (the update may hold NaN: FSDP2 cannot skip) stops the run at once."""
        result = p.resolve()
        dt = seconds_between(p.start_mark, p.end_mark)
        if result.tokens == 0:
            raise TrainingError(self._no_tokens_message(p.index))
        if not result.skipped and not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
            what = f"loss is {result.loss}" if not math.isfinite(result.loss) else f"grad norm is {result.grad_norm}"
            raise TrainingError(
                f"{what} at step {p.index + 1} (lr {self.schedule(p.index):.3e}); training "
                "stopped without saving (the last good checkpoint stays). Try a lower train.lr, a longer "
                "train.warmup_iters, train.clip_grad=1.0, or precision.dtype=bf16 instead of fp16")
        reason = self.guard.observe(p.index, result, p.spike_threshold)
        self._log(result, dt, p.index + 1, p.mem_gb, p.host_s, reason)
        self.guard.check(self.schedule(p.index), self.checkpoints.last_saved_step if self.checkpoints else None)
        return result, self.stop.agreed(self.world_size, self.device, p.votes)

    def _log(self, r: StepResult, dt: float, step: int, mem_gb: Optional[float], host_s: Optional[float] = None,
             skip_reason: Optional[str] = None) -> None:
        """Log step ``step`` (1-based) that took ``dt`` seconds (``megacore.training.step_record``)."""
        cuda = self.device.type == "cuda"
        record = step_record(r, dt, step, lr=self.schedule(step - 1), consumed_samples=self.data.first_sample(step),
                             tokens_per_step=self.cfg.train.global_batch_size * self.cfg.model.seq_length,
                             skip_reason=skip_reason, host_s=host_s, mem_gb=mem_gb if cuda else None,
                             flops_per_token=self.flops_per_token if cuda else None, world_size=self.world_size,
                             peak_tflops=self.peak_tflops)
        # A skipped step is always printed: the console shows every step the run did not learn from.
        self.metrics.log_step(record, print_line=step % self.cfg.log.interval == 0 or step == 1 or r.skipped)
