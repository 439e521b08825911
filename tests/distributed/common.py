"""Shared pieces of the data-parallel tests: a tiny GPT, a deterministic global batch stream, the
plain-torch single-rank reference run and the megacore DP run.

The reference is independent of megacore.distributed/megacore.optim.optimizer: one model, the
whole global batch, ``loss = sum of per-token losses / labelled tokens``, ``torch.nn.utils.clip_grad_norm_``
and ``torch.optim.AdamW``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megacore.config import TransformerConfig
from megacore.models.gpt import GPTModel

SEED = 7
GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 96
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP = 1.0
STEPS = 10


def tiny_config() -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                             vocab_size=VOCAB, seq_length=SEQ, vocab_padding_multiple=32, add_bias_linear=True,
                             normalization="LayerNorm")


def build_model(dtype: torch.dtype = torch.float32) -> GPTModel:
    model = GPTModel(tiny_config(), seed=SEED)
    return model.to(dtype)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels [G, S]; ~30% of labels ignored, more in the first samples (uneven counts per rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    drop = torch.rand(GLOBAL_BATCH, SEQ, generator=gen) < torch.linspace(0.6, 0.1, GLOBAL_BATCH)[:, None]
    labels[drop] = -100
    return tokens, labels


def no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2


def reference_run(steps: int = STEPS, clip: float = CLIP, micro: int = GLOBAL_BATCH, snapshots=()):
    """Single-rank plain-torch run: returns (params {name: tensor}, grad norms, losses, {step: params}).

    ``micro < GLOBAL_BATCH`` accumulates over micro-batches (same math, another summation order);
    ``snapshots`` lists step counts after which to also keep a copy of the parameters.
    """
    model = build_model()
    groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n, p)]},
              {"params": [p for n, p in model.named_parameters() if no_decay(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, **HP)
    norms, losses, kept = [], [], {}
    for step in range(steps):
        tokens, labels = global_batch(step)
        n_tokens = int((labels != -100).sum())
        loss = 0.0
        for i in range(0, GLOBAL_BATCH, micro):
            part = model(tokens[i:i + micro], labels=labels[i:i + micro], reduction="sum") / n_tokens
            part.backward()
            loss += float(part.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        losses.append(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in snapshots:
            kept[step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, losses, kept


def local_micro_batches(step: int, dp_rank: int, dp_size: int, micro: int):
    """This rank's contiguous slice of the global batch, split into micro-batches, and the global token count."""
    tokens, labels = global_batch(step)
    n_global = int((labels != -100).sum())
    per_rank = GLOBAL_BATCH // dp_size
    t, l = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank], labels[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [(t[i:i + micro], l[i:i + micro]) for i in range(0, per_rank, micro)], n_global


def train_steps(ddp, opt, steps: int, micro: int, dp_group=None, scale_loss: bool = False, before_step=None,
                first_step: int = 0):
    """The megacore DP loop over global steps ``first_step ...``: no_sync on all but the last
    micro-batch, finish_grad_sync, step.

    Returns (list of StepInfo, list of global losses).
    """
    from megacore.distributed.comm import group_rank, group_size

    r, n = group_rank(dp_group), group_size(dp_group)
    infos, losses = [], []
    for step in range(first_step, first_step + steps):
        opt.zero_grad()
        mbs, n_global = local_micro_batches(step, r, n, micro)
        total = torch.zeros(())
        for i, (t, l) in enumerate(mbs):
            ctx = ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext()
            with ctx:
                loss = ddp(t, labels=l, reduction="sum") / n_global
                (opt.scale_loss(loss) if scale_loss else loss).backward()
            total += loss.detach().float()
        ddp.finish_grad_sync()
        if before_step is not None:
            before_step(step)
        infos.append(opt.step())
        if n > 1:
            dist.all_reduce(total, group=dp_group)
        losses.append(float(total))
    ddp.finish_param_sync()
    return infos, losses


def max_rel_err(params: dict, ref: dict) -> float:
    """max over tensors of ||a - b|| / ||b||."""
    return max(float((params[k].float() - ref[k]).norm() / ref[k].norm().clamp(min=1e-30)) for k in ref)


def global_rel_err(params: dict, ref: dict) -> float:
    """||all params - all reference params|| / ||all reference params|| (one vector of every tensor)."""
    num = sum(float((params[k].float() - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


def run_case(fn, *args, **kwargs):
    """Run one case inside a world; return ("ok", value) or ("error", traceback) so one failing case
    does not hide the others."""
    import traceback

    try:
        return ("ok", fn(*args, **kwargs))
    except Exception:
        return ("error", traceback.format_exc())


@contextlib.contextmanager
def quiet_deprecations():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
