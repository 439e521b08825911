"""One spawned gloo world per size runs every multi-rank case (tests/distributed/worlds.py); the
test files assert on its per-case results. Cached for the session so each world starts once."""

from __future__ import annotations

import pytest

from tests.dist.harness import run_distributed

_RESULTS: dict[int, list[dict]] = {}


def world_results(world_size: int) -> list[dict]:
    if world_size not in _RESULTS:
        from tests.distributed.worlds import run_world

        _RESULTS[world_size] = run_distributed(run_world, world_size, timeout_s=300)
    return _RESULTS[world_size]


def case(world_size: int, name: str) -> list:
    """The value of case ``name`` on every rank; fails with the rank's traceback if it raised."""
    values = []
    for rank, results in enumerate(world_results(world_size)):
        status, value = results[name]
        if status != "ok":
            pytest.fail(f"case {name!r} failed on rank {rank} of {world_size}:\n{value}")
        values.append(value)
    return values
