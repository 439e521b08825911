"""Tensor-parallel layers and shard layouts against plain nn.Linear / nn.Embedding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megacore.parallel as P
from megacore.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TPLayout,
                                             VocabParallelEmbedding, full_tensor)
from megacore.sharding import peek_meta
from tests.dist.harness import run_distributed


# ------------------------------------------------------------------------------------------ layouts
def test_contiguous_and_fused_layouts_shard_and_assemble():
    full = torch.arange(24.0).view(12, 2)
    lay = TPLayout.contiguous(0, 12, 3)
    shards = [lay.shard(full, r) for r in range(3)]
    assert torch.equal(shards[1], full[4:8])
    assert torch.equal(lay.assemble(shards), full)
    fused = TPLayout.fused(0, [6, 6], 3)  # [gate; up]
    s1 = fused.shard(full, 1)
    assert torch.equal(s1, torch.cat([full[2:4], full[8:10]]))
    assert torch.equal(fused.assemble([fused.shard(full, r) for r in range(3)]), full)
    assert not fused.replicated
    with pytest.raises(ValueError, match="not divisible"):
        TPLayout.fused(0, [6, 5], 3)


def _qkv_rows_reference(nq, nkv, hd, t, r):
    """Rows rank r must hold: its heads r·nq/t.., then the k and v rows of their (single or
    several) KV groups; built head by head from the grouped layout definition."""
    qpg = nq // nkv
    heads = range(r * nq // t, (r + 1) * nq // t)
    groups = sorted({h // qpg for h in heads})
    rows = []
    for g in groups:
        base = g * (qpg + 2) * hd
        for h in heads:
            if h // qpg == g:
                rows += range(base + (h - g * qpg) * hd, base + (h - g * qpg + 1) * hd)
        rows += range(base + qpg * hd, base + (qpg + 2) * hd)
    return rows


@pytest.mark.parametrize("nq,nkv,t", [(8, 8, 2), (8, 4, 4), (8, 2, 2), (8, 2, 4), (8, 1, 4), (8, 2, 8), (6, 3, 3)])
def test_grouped_qkv_layout(nq, nkv, t):
    hd = 2
    lay = TPLayout.grouped_qkv(nq, nkv, hd, t)
    for r in range(t):
        assert lay.local_index(r).tolist() == _qkv_rows_reference(nq, nkv, hd, t, r)
    assert lay.replicated == (t > nkv)
    owned = sum(int(lay.owned_mask(r).sum()) for r in range(t))
    assert owned == lay.global_size  # every row counted exactly once
    full = torch.randn(lay.global_size, 3)
    assert torch.equal(lay.assemble([lay.shard(full, r) for r in range(t)]), full)


def test_grouped_qkv_rejects_incompatible_sizes():
    with pytest.raises(ValueError, match="num_query_groups"):
        TPLayout.grouped_qkv(6, 3, 2, 2)


def test_shard_fn_is_readable_by_checkpoint_boxes():
    boxes = pytest.importorskip("megacore.checkpoint.boxes")
    layer = ColumnParallelLinear(4, 8, bias=False, layout=TPLayout.fused(0, [4, 4], 1))
    gshape, segs = boxes.tensor_segments(layer.weight)
    assert gshape == (8, 4) and sum(s.shape[0] for s in segs) == 8


# ------------------------------------------------------------------------------------------- layers
def _shard_like(layer, ref):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            full = getattr(ref, name)
            p.copy_(peek_meta(p).shard(full))


def _layer_cases(rank, world):
    """Each rank backpropagates its own share of the reference loss Σ y·upstream: the local output
    columns (column-parallel), its sequence shard (SP), or the full replicated output (gathered /
    all-reduced outputs, whose backward keeps only this rank's part). Gathered parameter grads and
    this rank's input grad must then equal the dense layer's."""
    failures = []
    torch.manual_seed(0)  # the dense reference layers must be the same on every rank
    state = P.initialize(tensor=world)
    group, t = state.tp_group, world
    B, S, H, O = 2, 4, 6, 8

    def compare(tag, got, want, tol=1e-6):
        if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
            failures.append(f"{tag}: {tuple(got.shape)} vs {tuple(want.shape)}")

    def seq(x):  # this rank's sequence-parallel shard: token chunk r of the flattened batch
        return x.reshape(-1, x.shape[-1]).chunk(t, 0)[rank].view(x.shape[0], x.shape[1] // t, x.shape[-1])

    def cols(x):
        return x.chunk(t, -1)[rank]

    for sp in (False, True):
        gen = torch.Generator().manual_seed(3)
        x_full = torch.randn(B, S, H, generator=gen)
        upstream = torch.randn(B, S, O, generator=gen)
        ref = nn.Linear(H, O)
        x_ref = x_full.clone().requires_grad_(True)
        y_ref = ref(x_ref)
        (y_ref * upstream).sum().backward()
        for kind in ("column", "column_gather", "row", "row_scatter_input"):
            if kind.startswith("column"):
                layer = ColumnParallelLinear(H, O, tp_group=group, sequence_parallel=sp,
                                             gather_output=kind == "column_gather")
                x_in, want_dx = (seq(x_full), seq(x_ref.grad)) if sp else (x_full, x_ref.grad)
                want_y, g = (y_ref, upstream) if kind == "column_gather" else (cols(y_ref), cols(upstream))
            else:
                layer = RowParallelLinear(H, O, tp_group=group, sequence_parallel=sp,
                                          input_is_parallel=kind == "row")
                x_in, want_dx = (cols(x_full), cols(x_ref.grad)) if kind == "row" else (x_full, x_ref.grad)
                want_y, g = (seq(y_ref), seq(upstream)) if sp else (y_ref, upstream)
            _shard_like(layer, ref)
            x_in = x_in.clone().requires_grad_(True)
            y = layer(x_in)
            compare(f"{kind} sp={sp} forward", y.detach(), want_y.detach())
            (y * g).sum().backward()
            compare(f"{kind} sp={sp} dx", x_in.grad, want_dx)
            for name, p in layer.named_parameters():
                compare(f"{kind} sp={sp} grad {name}", full_tensor(p, p.grad), getattr(ref, name).grad)

        emb_ref = nn.Embedding(12, H)
        emb = VocabParallelEmbedding(12, H, tp_group=group, sequence_parallel=sp)
        _shard_like(emb, emb_ref)
        ids = torch.randint(0, 12, (B, S), generator=gen)
        g = torch.randn(B, S, H, generator=gen)
        out_ref = emb_ref(ids)
        (out_ref * g).sum().backward()
        out = emb(ids)
        compare(f"embedding sp={sp} forward", out.detach(), (seq(out_ref) if sp else out_ref).detach())
        (out * (seq(g) if sp else g)).sum().backward()
        compare(f"embedding sp={sp} grad", full_tensor(emb.weight, emb.weight.grad), emb_ref.weight.grad)
    P.destroy()
    return failures


def test_tp_layers_match_dense_layers():
    results = run_distributed(_layer_cases, world_size=2)
    assert results == [[], []], results


def test_layers_without_group_are_dense():
    lin = nn.Linear(5, 6)
    col = ColumnParallelLinear(5, 6)
    row = RowParallelLinear(5, 6)
    _shard_like(col, lin)
    _shard_like(row, lin)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(col(x), lin(x))
    torch.testing.assert_close(row(x), lin(x))
    emb = VocabParallelEmbedding(7, 4)
    ref = nn.Embedding(7, 4)
    _shard_like(emb, ref)
    ids = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(emb(ids), F.embedding(ids, ref.weight))
