"""Optimizer-state bytes per rank (from the tensors themselves) shrink as 1/DP with the distributed optimizer."""

import pytest

from tests.distributed.conftest import case


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype,bytes_per_param", [("fp32", 8), ("bf16", 12)])
def test_state_bytes_shrink_with_dp(world, dtype, bytes_per_param):
    r = case(world, f"bytes/{dtype}")[0]
    # Replicated: AdamW moments (4 + 4 B), plus an fp32 master (4 B) for bf16 params; fp32 params need no copy.
    assert r["replicated"] == bytes_per_param * r["numel"]
    # Distributed: the shards partition the parameters exactly ...
    assert sum(r["distributed_all_ranks"]) == r["replicated"]
    # ... and evenly (up to bucket padding), so each rank holds ~1/DP.
    assert max(r["distributed_all_ranks"]) <= 1.05 * r["replicated"] / world
