"""Which samples each rank reads: the training and validation sets, and global batch ``k`` cut into
this rank's micro-batches.

Samples are addressed by global index (``megacore.training.contract``): step ``k`` reads samples
``[first_sample(k), first_sample(k + 1))``; data-parallel rank ``r`` takes the ``r``-th contiguous
slice of ``G / DP`` of them, in micro-batches, and under context parallelism each rank keeps its
share of every sequence's tokens with their global positions. ``first_sample(k)`` is ``k x G``
unless a resume moved the anchor (a checkpoint whose global batch size differs: ``resume_at``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megacore.config import ConfigError, RunConfig
from megacore.distributed.comm import comm_device
from megacore.training.contract import PeerFailed, TrainingError, collate


class DataFeed:
    """The datasets of a run and this rank's view of them (see the module doc)."""

    def __init__(self, cfg: RunConfig, state, device: torch.device, rank: int, world_size: int,
                 info: Callable[[str], None]):
        self.cfg, self.state, self.device = cfg, state, device
        self.rank, self.world_size, self._info = rank, world_size, info
        self.tokenizer = None
        self.train_ds = self.valid_ds = None
        # The data position: step ``data_anchor[0]`` starts at sample ``data_anchor[1]`` (moved on a
        # resume whose global batch size differs from the checkpoint's; see ``first_sample``).
        self.data_anchor = (0, 0)

    def build(self) -> None:
        """Rank 0 trains/caches the tokenizer and builds the index files first; the others then read
        the cache (no two processes write the same cache file). The training set holds every sample
        up to the end of step ``train.iters`` (``first_sample``; sample ``i`` is the same sample
        whatever the total, see ``megacore.data.gpt_dataset``)."""
        t = self.cfg.train
        n_train = self.first_sample(t.iters)
        n_eval = (t.iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
        for turn in ((0,), tuple(range(1, self.world_size))):
            failure = None
            if self.rank in turn:
                try:
                    self._load(n_train, n_eval)
                except (ConfigError, TrainingError) as e:
                    failure = e
            if self.world_size > 1:
                # Everyone learns whether any rank failed, so no rank waits forever on the others.
                flag = torch.tensor([0.0 if failure is None else 1.0], device=comm_device(self.device))
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if failure is None and flag.item() > 0:
                    raise PeerFailed("another rank could not build the data; its message says why")
            if failure is not None:
                raise failure
        if self.train_ds is None:
            raise TrainingError("the training split is empty; check data.split (e.g. 969,30,1) and data.paths")

    def _load(self, n_train: int, n_eval: int) -> None:
        from megacore.data import build_datasets, build_tokenizer

        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = build_tokenizer(cfg.data, log=self._info)
        # model.from_hf fixes the vocabulary (its weights): the tokenizer may use fewer ids, not change it.
        if self.tokenizer is not None and cfg.model.vocab_size != self.tokenizer.vocab_size and not cfg.model.from_hf:
            self._info(f"model.vocab_size set to the tokenizer's {self.tokenizer.vocab_size}")
            cfg.model.vocab_size = self.tokenizer.vocab_size
        self.train_ds, self.valid_ds, _ = build_datasets(
            cfg.data, seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size, seed=t.seed,
            num_samples=(n_train, n_eval, 0), tokenizer=self.tokenizer, log=self._info)
        if cfg.vision.enabled:  # data.source=mock (validated): synthetic images with the text
            from megacore.data.mock import MockImageTextDataset

            v = cfg.vision
            shape = (v.num_channels, v.image_size, v.image_size)
            self.train_ds, self.valid_ds = (
                MockImageTextDataset(ds, v.image_token_id, v.image_seq_length, shape, seed=t.seed + i) if ds else None
                for i, ds in enumerate((self.train_ds, self.valid_ds)))

    def resume_at(self, result, step: int) -> None:
        """Continue the sample stream where the checkpoint left it: at its ``consumed_samples``, not
        at ``step x train.global_batch_size``, which differs when the global batch size changed
        (the same samples would be seen twice or never). A checkpoint without the number (a
        converted one) resumes at ``step x global_batch_size``, the position this run would have."""
        g = self.cfg.train.global_batch_size
        extra = result.extra if isinstance(result.extra, dict) else {}
        consumed = extra.get("consumed_samples")
        if consumed is None:
            return
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise TrainingError(f"checkpoint {result.path} records consumed_samples={consumed!r}, not a sample count; "
                                "it was not written by megacore train, or is damaged: resume from another checkpoint")
        if consumed == step * g:
            return
        saved_g = ((extra.get("run_config") or {}).get("train") or {}).get("global_batch_size", "another value")
        self.data_anchor = (step, consumed)
        self._info(f"data: the checkpoint consumed {consumed} samples in {step} steps (global batch size "
                   f"{saved_g}); continuing at sample {consumed} with train.global_batch_size={g}")
        if self.first_sample(self.cfg.train.iters) > len(self.train_ds):
            self.build()  # more samples than sized for before the position was known

    def first_sample(self, step: int) -> int:
        """Global index of the first training sample of step ``step`` (0-based); the samples of step
        ``k`` are ``[first_sample(k), first_sample(k + 1))``. Without a moved anchor: ``k x G``."""
        anchor_step, anchor_sample = self.data_anchor
        return anchor_sample + (step - anchor_step) * self.cfg.train.global_batch_size

    def micro_slices(self) -> list[range]:
        """This data-parallel rank's micro-batches, as offsets into one global batch."""
        t = self.cfg.train
        per_rank = t.global_batch_size // self.state.dp_size
        start = self.state.dp_rank * per_rank
        return [range(start + i, start + i + t.micro_batch_size) for i in range(0, per_rank, t.micro_batch_size)]

    def micro_batches(self, dataset, batch_index: int, first: Optional[int] = None) -> tuple[list[dict], float]:
        """This rank's micro-batches of global batch ``batch_index`` (whose first sample is ``first``,
        default ``batch_index x global_batch_size``), and their labelled-token count (counted on the
        host before the copy to the device, so counting never waits for the GPU)."""
        base = batch_index * self.cfg.train.global_batch_size if first is None else first
        cp, cp_rank = self.state.cp_size, self.state.cp_rank
        # Context parallel: keep this rank's tokens with their rotary positions (global, or per document).
        keep_positions = self.cfg.data.reset_position_ids or cp > 1
        out, labelled = [], 0.0
        for r in self.micro_slices():
            samples = [dataset[base + i] for i in r]
            if cp > 1:
                from megacore.parallel.context_parallel import split_sample_for_cp

                samples = [split_sample_for_cp(s, cp, cp_rank) for s in samples]
            labelled += float(sum(s["loss_mask"].sum() for s in samples))
            mb = collate(samples, self.device)
            if not keep_positions:
                mb.pop("position_ids", None)
            out.append(mb)
        return out, labelled
