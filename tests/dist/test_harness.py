import torch
import torch.distributed as dist

from tests.dist.harness import run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_harness_all_reduce_sums_ranks():
    out = run_distributed(_allreduce_rank, world_size=2)
    assert out == [3.0, 3.0]
