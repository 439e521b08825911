"""``Trainer``: builds everything a run needs from a ``RunConfig`` and runs the loop.

    cfg = load_run_config("configs/tiny_cpu.yaml", ["train.iters=50"]).validate()
    summary = Trainer(cfg).run()

See ``megacore.training.loop`` for the loss-normalization and data-order contract.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megacore.config import RunConfig
from megacore.training.flops import flops_per_token, peak_tflops
from megacore.training.loop import DTYPES, StepResult, StopFlag, TrainingError, collate, resolve_device
from megacore.training.lr_schedule import LRSchedule
from megacore.training.metrics import MetricsLogger


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay for biases, norm weights and other 1-D parameters; decay for matrices."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = resolve_device(cfg)
        self.dtype = DTYPES[cfg.precision.dtype]
        self.stop = StopFlag()
        self.step = 0

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        from megacore.data import build_datasets, build_tokenizer

        self.tokenizer = build_tokenizer(cfg.data, log=self._info)
        if self.tokenizer is not None and cfg.model.vocab_size != self.tokenizer.vocab_size:
            self._info(f"model.vocab_size set to the tokenizer's {self.tokenizer.vocab_size}")
            cfg.model.vocab_size = self.tokenizer.vocab_size
        cfg.validate(self.world_size)
        t = cfg.train
        n_train = t.iters * t.global_batch_size
        n_eval = (t.iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
        self.train_ds, self.valid_ds, _ = build_datasets(
            cfg.data, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size, seed=t.seed,
            num_samples=(n_train, n_eval, 0), tokenizer=self.tokenizer, log=self._info)
        self.model = self.build_model()
        self.optimizer = torch.optim.AdamW(
            weight_decay_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps)
        self.schedule = LRSchedule(t)
        self.metrics = MetricsLogger(cfg.log.dir, enabled=self.rank == 0, tensorboard=cfg.log.tensorboard,
                                     total_iters=t.iters)
        self.flops_per_token = flops_per_token(cfg.model)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_tflops = peak_tflops(name)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._info(f"model: {n_params / 1e6:.1f}M parameters, {cfg.model.num_layers} layers, "
                   f"hidden {cfg.model.hidden_size}, seq {cfg.model.seq_length}, device {name}, dtype {cfg.precision.dtype}")

    def build_model(self) -> torch.nn.Module:
        from megacore.models.gpt import GPTModel
        from megacore.models.init import materialize

        cfg = self.cfg
        with torch.device("meta"):
            model = GPTModel(cfg.model)
        materialize(model, cfg.model, cfg.train.seed, device=self.device, dtype=self.dtype)
        model.configure_recompute(cfg.recompute)
        model.train()
        return model

    def _info(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[megacore] {msg}", flush=True)

    # ------------------------------------------------------------------------------- data
    def global_batch(self, dataset, step: int) -> list[dict]:
        g = self.cfg.train.global_batch_size
        return [dataset[i] for i in range(step * g, (step + 1) * g)]

    def micro_batches(self, samples: list[dict]) -> list[dict]:
        mbs = self.cfg.train.micro_batch_size
        return [collate(samples[i:i + mbs], self.device) for i in range(0, len(samples), mbs)]

    # ------------------------------------------------------------------------------- step
    def train_step(self, step: int) -> StepResult:
        micro = self.micro_batches(self.global_batch(self.train_ds, step))
        num_tokens = sum(int(mb["loss_mask"].sum().item()) for mb in micro)
        if num_tokens == 0:
            raise TrainingError(f"step {step}: the global batch has no labelled tokens; check data.eod_mask_loss and the data")
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for mb in micro:
            loss = self.model(mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"],
                              position_ids=mb.get("position_ids") if self.cfg.data.reset_position_ids else None,
                              reduction="sum") / num_tokens
            loss.backward()
            total += loss.detach().float()
        clip = self.cfg.train.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        return StepResult(loss=total.item(), grad_norm=float(grad_norm), tokens=num_tokens)

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        self.model.eval()
        t = self.cfg.train
        loss_sum, tokens = 0.0, 0
        base = (step // t.eval_interval) * t.eval_iters if t.eval_interval else 0
        for k in range(t.eval_iters):
            for mb in self.micro_batches(self.global_batch(self.valid_ds, base + k)):
                loss_sum += self.model(mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"], reduction="sum").item()
                tokens += int(mb["loss_mask"].sum().item())
        self.model.train()
        return loss_sum / max(tokens, 1)

    # ------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        self.setup()
        cfg, t = self.cfg, self.cfg.train
        self.stop.install()
        first_loss = last_loss = None
        start = time.time()
        self.metrics.reset_timer(self.step)
        try:
            while self.step < t.iters:
                step_start = time.time()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                result = self.train_step(self.step)
                if not math.isfinite(result.loss):
                    raise TrainingError(
                        f"loss is {result.loss} at step {self.step + 1} (lr {self.schedule(self.step):.3e}); training stopped. "
                        "Try a lower train.lr, a longer train.warmup_iters, train.clip_grad=1.0, or precision.dtype=bf16 instead of fp16")
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.time() - step_start
                self.step += 1
                first_loss = result.loss if first_loss is None else first_loss
                last_loss = result.loss
                self._log(result, dt)
                if t.eval_interval and self.step % t.eval_interval == 0 and self.valid_ds is not None:
                    self.metrics.log_eval(self.step, self.evaluate(self.step))
                if self.stop.requested:
                    self._info(f"received {self.stop.signal_name}: stopping cleanly after step {self.step}")
                    break
        finally:
            self.stop.restore()
            self.metrics.close()
        wall = time.time() - start
        self._info(f"done: {self.step} steps in {wall:.1f}s, first loss {first_loss:.4f}, last loss {last_loss:.4f}"
                   if first_loss is not None else "done: no steps run")
        return {"steps": self.step, "first_loss": first_loss, "last_loss": last_loss, "wall_s": wall,
                "stopped_by_signal": self.stop.requested}

    def _log(self, r: StepResult, dt: float) -> None:
        tokens_global = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        tps = tokens_global / dt
        record = {"step": self.step, "loss": r.loss, "grad_norm": r.grad_norm, "lr": self.schedule(self.step - 1),
                  "tokens_per_s": tps, "step_time_s": dt, "labelled_tokens": r.tokens}
        if self.device.type == "cuda":
            achieved = tps * self.flops_per_token / self.world_size / 1e12
            record["tflops_per_gpu"] = achieved
            record["mfu"] = achieved / self.peak_tflops if self.peak_tflops else None
            record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if r.loss_scale is not None:
            record["loss_scale"] = r.loss_scale
            record["skipped"] = r.skipped
        self.metrics.log_step(record, print_line=self.step % self.cfg.log.interval == 0 or self.step == 1)
