"""The global grad norm with more TP ranks than KV groups equals the one-device norm.

With ``tensor > num_query_groups`` the fused QKV weight (and bias) holds each KV group's k/v rows
on ``tensor / num_query_groups`` ranks. The norm must count those rows once (on their owner rank,
``TPLayout.owned_mask``), not once per holder. One spawned 4-rank gloo world runs every case:

* TP=2 x DP=2 with one KV head (MQA), sequence parallel, TP sums deferred to ``finish_grad_sync``
  (what ``megacore train`` does);
* TP=4 x DP=1 with two KV groups, TP sums in gradient hooks;

each through the replicated optimizer, the distributed optimizer (flat DP shards of the gradient
buffer) and ``clip_grad_norm``. The reference is independent of megacore's norm code: the plain
one-device ``GPTModel`` on the whole global batch and ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.harness import run_distributed
from megacore.sharding import param_meta, peek_meta

REL_TOL = 1e-5  # fp32; the bug is a relative error of ~1e-2
LAYOUTS = {"tp2_kv1_sp_dp2": (2, 1, True, "finalize"), "tp4_kv2": (4, 2, False, "hook")}
KINDS = ("replicated", "distopt", "clip_fn")
SEED = 11


# ----------------------------------------------------------------------------- one process: the pieces
def _fake_param(layout, rank: int, local: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty_like(local))
    meta = param_meta(p)
    meta.tp_layout, meta.tp_rank = layout, rank
    return p


def _layouts():
    from megacore.parallel.tensor_parallel import TPLayout

    # (layout, local shape of rank 0 with the layout's dim at its local size)
    yield TPLayout.grouped_qkv(8, 2, 2, 4), (8, 3)    # KV groups on 2 ranks each (weight)
    yield TPLayout.grouped_qkv(8, 1, 2, 4), (8,)       # one KV group on 4 ranks (bias)
    yield TPLayout.grouped_qkv(8, 8, 2, 2), (24, 5)    # whole groups per rank: nothing replicated
    # dim 1, interleaved: rank 0 holds rows 0,1,2,4; rank 1 holds rows 1,2,3,4 (it owns row 3 only)
    yield TPLayout(1, 5, (((0, 3), (4, 1)), ((1, 4),))), (3, 4, 2)


@pytest.mark.parametrize("split", [1, 3, 7])
def test_counted_grads_count_every_global_element_once(split):
    """For any split of each rank's flat gradient into ``split`` contiguous shards (as the
    distributed optimizer's buckets do), the squares of the counted pieces over every rank and
    shard sum to the full tensor's: each global element exactly once. The pieces are views."""
    from megacore.distributed.grad_clip import counted_grads

    gen = torch.Generator().manual_seed(split)
    for layout, shape in _layouts():
        full_shape = list(shape)
        full_shape[layout.dim] = layout.global_size
        full = torch.randn(full_shape, generator=gen, dtype=torch.float64)
        total = 0.0
        for r in range(layout.tp_size):
            local = layout.shard(full, r).contiguous()
            assert tuple(local.shape) == shape
            p = _fake_param(layout, r, local)
            start = 0
            for part in local.reshape(-1).tensor_split(split):
                pieces = counted_grads(p, part, start, tp_group=None)
                for piece in pieces:  # views into this shard, no copies
                    assert piece.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
                total += sum(float(piece.pow(2).sum()) for piece in pieces)
                start += part.numel()
        assert total == pytest.approx(float(full.pow(2).sum()), rel=1e-12), layout


def test_owned_runs_are_few_and_cached():
    from megacore.distributed.grad_clip import owned_flat_runs
    from megacore.parallel.tensor_parallel import TPLayout

    layout = TPLayout.grouped_qkv(8, 2, 2, 4)  # rank 2g + j: 2 query heads, then k_g and v_g (head_dim 2)
    owner = _fake_param(layout, 2, torch.zeros(8, 3))
    other = _fake_param(layout, 3, torch.zeros(8, 3))
    assert owned_flat_runs(owner) is None                    # owns all of its rows
    assert owned_flat_runs(other) == ((0, 4 * 3),)           # its 4 query rows only
    assert owned_flat_runs(other) is owned_flat_runs(_fake_param(layout, 3, torch.zeros(8, 3)))
    with pytest.raises(ValueError, match="does not match its TP layout"):
        owned_flat_runs(_fake_param(layout, 3, torch.zeros(6, 3)))


# ------------------------------------------------------------------------------ 4 ranks: the real model
def _config(kv: int):
    from megacore.config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=kv,
                             ffn_hidden_size=64, vocab_size=96, seq_length=16, vocab_padding_multiple=32,
                             add_qkv_bias=True)


def _reference(kv: int, max_norm: float):
    """(norm before clipping, {name: clipped grad}) of the one-device model on the global batch."""
    from megacore.models import GPTModel
    from tests.distributed.common import global_batch

    ref = GPTModel(_config(kv), seed=SEED)
    tokens, labels = global_batch(0)
    (ref(tokens, labels=labels, reduction="sum") / int((labels != -100).sum())).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
    return norm, {n: p.grad for n, p in ref.named_parameters()}


def _layout_case(tp: int, kv: int, sp: bool, grad_sync: str, kind: str) -> dict:
    import megacore.parallel as P
    from megacore.compose import build_parallel_gpt
    from megacore.distributed import DistributedDataParallel, clip_grad_norm
    from megacore.optim import DistributedOptimizer
    from megacore.optim.optimizer import MixedPrecisionOptimizer
    from tests.distributed.common import local_micro_batches

    ref_norm, ref_grads = _reference(kv, max_norm=float("inf"))
    max_norm = 0.5 * ref_norm  # clipping acts
    clipped_norm, clipped_grads = _reference(kv, max_norm)
    state = P.initialize(tensor=tp)
    try:
        P.model_parallel_seed(1)
        model = build_parallel_gpt(_config(kv), SEED, sequence_parallel=sp, grad_sync=grad_sync)
        replicated = sum(int(peek_meta(p).tp_layout.replicated) for p in model.parameters()
                         if peek_meta(p).tp_layout is not None)
        [(mb_tokens, mb_labels)], n_global = local_micro_batches(0, state.dp_rank, state.dp_size,
                                                                 micro=8 // state.dp_size)
        if kind == "clip_fn":  # no DDP: every rank runs the whole batch, p.grad holds the full gradient
            from tests.distributed.common import global_batch

            tokens, labels = global_batch(0)
            (model(tokens, labels=labels, reduction="sum") / n_global).backward()
            if grad_sync == "finalize":
                P.finalize_grads_tp(model)
            norm = float(clip_grad_norm(model.parameters(), max_norm, groups=(state.tp_group,),
                                        tp_group=state.tp_group))
            grads = P.gather_full_state_dict(model, grads=True)
            clip_err = max(float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                           for n, g in clipped_grads.items())
            return {"norm": norm, "ref": ref_norm, "clip_err": clip_err, "replicated_params": replicated}
        distributed = kind == "distopt"
        ddp = DistributedDataParallel(model, state.dp_cp_group, bucket_size_mb=0.004,
                                      use_distributed_optimizer=distributed)
        cls = DistributedOptimizer if distributed else MixedPrecisionOptimizer
        opt = cls(ddp, lr=1e-3, clip_grad=max_norm, model_parallel_groups=(state.tp_group, state.pp_group),
                  tp_group=state.tp_group)
        opt.zero_grad()
        (ddp(mb_tokens, labels=mb_labels, reduction="sum") / n_global).backward()
        ddp.finish_grad_sync()
        info = opt.step()
        return {"norm": float(info.grad_norm), "ref": ref_norm, "replicated_params": replicated,
                "num_buckets": sum(len(b.buckets) for b in ddp.grad_buffers)}
    finally:
        P.destroy()


def _world(rank: int, world_size: int) -> dict:
    import traceback

    torch.manual_seed(0)
    out = {}
    for name, (tp, kv, sp, grad_sync) in LAYOUTS.items():
        for kind in KINDS:
            try:
                out[f"{name}/{kind}"] = ("ok", _layout_case(tp, kv, sp, grad_sync, kind))
            except Exception:
                out[f"{name}/{kind}"] = ("error", traceback.format_exc())
    return out


_RESULTS: list = []


def _case(name: str) -> list[dict]:
    if not _RESULTS:
        _RESULTS.extend(run_distributed(_world, 4, timeout_s=300))
    values = []
    for rank, results in enumerate(_RESULTS):
        status, value = results[name]
        if status != "ok":
            pytest.fail(f"case {name!r} failed on rank {rank}:\n{value}")
        values.append(value)
    return values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grad_norm_with_replicated_kv_rows_matches_one_device(layout, kind):
    for rank, r in enumerate(_case(f"{layout}/{kind}")):
        assert r["replicated_params"] >= 2, r  # the QKV weight and bias of each layer hold replicated rows
        assert abs(r["norm"] - r["ref"]) <= REL_TOL * r["ref"], (rank, r)
        if kind == "clip_fn":  # and the clipped gradients are the one-device clipped ones
            assert r["clip_err"] <= 1e-5, (rank, r)
        if kind == "distopt":
            assert r["num_buckets"] > 1, r  # the shards split parameters (QKV rows) between DP ranks
