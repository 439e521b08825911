"""Unit tests of the exact tensor transforms and the shard/size helpers (no transformers needed)."""

from __future__ import annotations

import pytest
import torch

from megacore.interop.hf_io import parse_size, plan_shards
from megacore.interop.hf_weights import fuse_qkv, split_qkv


def _reference_fused(q, k, v, heads, groups, head_dim):
    """Row-by-row construction of the grouped layout: per group, its q heads, then k_g, then v_g."""
    per_group = heads // groups
    rows = []
    for g in range(groups):
        for j in range(per_group):
            h = g * per_group + j
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("with_cols", [True, False])  # weight [rows, h] or bias [rows]
def test_fuse_split_qkv_matches_rowwise_reference(heads, groups, with_cols):
    head_dim, hidden = 3, 5
    tail = (hidden,) if with_cols else ()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(heads * head_dim, *tail, generator=gen)
    k = torch.randn(groups * head_dim, *tail, generator=gen)
    v = torch.randn(groups * head_dim, *tail, generator=gen)
    fused = fuse_qkv(q, k, v, groups)
    assert torch.equal(fused, _reference_fused(q, k, v, heads, groups, head_dim))
    q2, k2, v2 = split_qkv(fused, heads, groups, head_dim)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_parse_size():
    assert parse_size("20KB") == 20_000
    assert parse_size("2GiB") == 2 * 2 ** 30
    assert parse_size(" 1.5 MB ") == 1_500_000
    assert parse_size(123) == 123
    for bad in ("lots", "5XB", 0, -1):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_plan_shards_respects_limit_and_order():
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([10, 10, 30, 5, 5, 5])}  # fp32: 4 bytes each
    shards = plan_shards(tensors, max_bytes=80)
    assert [n for s in shards for n in s] == list(tensors)  # order kept, nothing lost
    assert shards == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards(tensors, max_bytes=10) == [[n] for n in tensors]  # oversized tensors stand alone
