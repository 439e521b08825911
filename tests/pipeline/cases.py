"""Shared pieces of the pipeline tests: a tiny config, deterministic micro-batches, the one-device
reference (loss and every gradient by global parameter name) and the per-rank parity check."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacore.config import TransformerConfig
from megacore.sharding import peek_meta

SEED = 1234


def tiny_config(num_layers: int = 4, tie: bool = False, **kw) -> TransformerConfig:
    base = dict(num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=48, vocab_size=80, seq_length=8, vocab_padding_multiple=16, tie_embeddings=tie)
    base.update(kw)
    return TransformerConfig(**base).validate()


def make_micro_batches(n_mb: int, mb_size: int, config: TransformerConfig, seed: int = 0) -> list[dict]:
    """Random tokens/labels with some ignored labels (-100) and some zero loss-mask entries."""
    g = torch.Generator().manual_seed(seed)
    out = []
    s, v = config.seq_length, config.vocab_size
    for _ in range(n_mb):
        tokens = torch.randint(0, v, (mb_size, s), generator=g)
        labels = torch.randint(0, v, (mb_size, s), generator=g)
        labels[torch.rand(mb_size, s, generator=g) < 0.1] = -100
        loss_mask = (torch.rand(mb_size, s, generator=g) > 0.2).float()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
    return out


def num_tokens(micro_batches: list[dict]) -> float:
    """Labelled tokens of the global batch: positions with a label AND a non-zero loss mask."""
    return float(sum(((mb["labels"] != -100).float() * mb["loss_mask"]).sum() for mb in micro_batches))


def reference(config: TransformerConfig, micro_batches: list[dict], seed: int = SEED):
    """The one-device model's loss and gradients (fp32): plain GPTModel, loss = masked sum / N per micro-batch."""
    from megacore.models.gpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(config, seed=seed)
    n = num_tokens(micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss = model(mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"], reduction="sum") / n
        loss.backward()
        total += loss.item()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return total, grads


def param_names(config: TransformerConfig) -> list[str]:
    """Parameter names of the one-device model (built on meta: nothing is allocated)."""
    from megacore.models.gpt import GPTModel

    with torch.device("meta"):
        return [n for n, _ in GPTModel(config).named_parameters()]


def global_name(name: str, param) -> str:
    return (peek_meta(param).global_name or name)


def check_grads(chunks, ref_grads: dict, atol: float = 1e-5, rtol: float = 1e-5) -> list[str]:
    """Assert every local parameter's gradient equals the reference one; return the global names checked."""
    from megacore.pipeline import unwrap

    checked = []
    for chunk in chunks:
        for name, p in unwrap(chunk).named_parameters():
            gname = global_name(name, p)
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            assert grad is not None, f"{gname} got no gradient"
            ref = ref_grads[gname]
            ref = peek_meta(p).shard(ref)  # TP: compare with this rank's slice
            assert grad.shape == ref.shape, (gname, grad.shape, ref.shape)
            err = (grad.float() - ref).abs().max().item()
            assert torch.allclose(grad.float(), ref, atol=atol, rtol=rtol), f"{gname}: max abs err {err:.3e}"
            checked.append(gname)
    return checked


def loss_on_all_ranks(loss: torch.Tensor, group) -> float:
    """The loss lives on the last stage (0 elsewhere): sum over the pipeline group to see it everywhere."""
    t = loss.detach().clone()
    dist.all_reduce(t, group=group)
    return t.item()


def check_coverage(results: list, ref_names) -> None:
    """Every reference parameter was checked on some rank."""
    seen = set()
    for r in results:
        seen.update(r)
    missing = set(ref_names) - seen
    assert not missing, f"parameters never compared: {sorted(missing)}"


def run_parity(state, config, vp: int, schedule: str, n_mb: int, *, mb_size: int = 2, layers=None, data_seed: int = 0,
               ddp: bool = False, parallelize_fn=None, chunks=None, clip: bool = False):
    """Run one pipelined step of ``config`` and compare loss + every gradient with the one-device model.

    The global batch is ``n_mb * dp`` micro-batches; data-parallel rank r takes the r-th contiguous
    slice (the training loop's order). Returns (global names checked on this rank, chunks).
    """
    from megacore.pipeline import build_stage_modules, forward_backward

    dp = state.dp_size
    mbs = make_micro_batches(n_mb * dp, mb_size, config, seed=data_seed)
    ref_loss, ref_grads = reference(config, mbs)
    mine = mbs[state.dp_rank * n_mb:(state.dp_rank + 1) * n_mb]
    if chunks is None:
        chunks = build_stage_modules(config, state.pp_rank, state.pp_size, vp, SEED, "cpu", torch.float32, layers,
                                     parallelize_fn=parallelize_fn)
        if ddp:
            from megacore.distributed import DistributedDataParallel

            chunks = [DistributedDataParallel(c, state.dp_group, bucket_size_mb=0.01) for c in chunks]
    for c in chunks:
        if hasattr(c, "zero_grad_buffer"):
            c.zero_grad_buffer()
        else:
            c.zero_grad(set_to_none=True)
    loss = forward_backward(chunks, mine, num_tokens(mbs), state.pp_group, schedule)
    for c in chunks:
        if hasattr(c, "finish_grad_sync"):
            c.finish_grad_sync()
    total = loss.detach().clone()
    dist.all_reduce(total)  # stages other than the last contribute 0; DP ranks hold disjoint shares
    total = total.item() / state.tp_size  # every TP rank of the last stage holds the same loss
    assert abs(total - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (total, ref_loss)
    if clip:
        check_clipping(state, chunks, ref_grads)
    return check_grads(chunks, ref_grads), chunks


def check_clipping(state, chunks, ref_grads) -> None:
    """The global grad norm across stages equals the one-device norm (tied table counted once), and
    clipping scales every gradient by the one-device factor."""
    from megacore.distributed import clip_grad_norm
    from megacore.pipeline import unwrap

    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    params = [p for c in chunks for p in unwrap(c).parameters()]
    max_norm = 0.5 * ref_norm
    norm = clip_grad_norm(params, max_norm, groups=(state.tp_group, state.pp_group), tp_group=state.tp_group).item()
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    scale = max_norm / (ref_norm + 1e-6)
    for k in ref_grads:
        ref_grads[k] = ref_grads[k] * scale


def train_curves(state, config, vp: int, schedule: str, steps: int = 3, n_mb: int = 2):
    """A few AdamW steps with global-norm clipping, pipelined vs the one-device model: per-step losses
    (pipelined, reference) and the largest final parameter difference on this rank."""
    from megacore.distributed import clip_grad_norm
    from megacore.models.gpt import GPTModel
    from megacore.pipeline import build_stage_modules, forward_backward

    chunks = build_stage_modules(config, state.pp_rank, state.pp_size, vp, SEED, "cpu", torch.float32)
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ref = GPTModel(config, seed=SEED)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    curve = []
    for step in range(steps):
        mbs = make_micro_batches(n_mb, 2, config, seed=100 + step)
        n = num_tokens(mbs)
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(chunks, mbs, n, state.pp_group, schedule)
        clip_grad_norm(params, 1.0, groups=(state.pp_group,))
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = 0.0
        for mb in mbs:
            l_ = ref(mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"], reduction="sum") / n
            l_.backward()
            ref_loss += l_.item()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        curve.append((loss_on_all_ranks(loss, state.pp_group), ref_loss))
    full = dict(ref.named_parameters())
    diff = max((p - full[global_name(n_, p)]).abs().max().item() for c in chunks for n_, p in c.named_parameters())
    return curve, diff
