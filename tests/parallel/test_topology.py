"""Topology: rank tables against a brute-force coordinate reference, bad layouts, live groups."""

import itertools

import pytest
import torch
import torch.distributed as dist

import megacore.parallel as P
from megacore.config import ConfigError
from tests.dist.harness import run_distributed


def _reference_groups(world, tp, pp, cp, ep, etp):
    """Brute force: group ranks whose coordinates agree outside the varying dims."""
    dp = world // (tp * pp * cp)
    edp = world // (pp * ep * etp)

    def main_coords(r):
        return {"tp": r % tp, "cp": (r // tp) % cp, "dp": (r // (tp * cp)) % dp, "pp": r // (tp * cp * dp)}

    def expert_coords(r):
        return {"etp": r % etp, "ep": (r // etp) % ep, "edp": (r // (etp * ep)) % edp, "pp": r // (etp * ep * edp)}

    def groups(coords, varying):
        buckets = {}
        for r in range(world):
            c = coords(r)
            key = tuple(sorted((k, v) for k, v in c.items() if k not in varying))
            buckets.setdefault(key, []).append(r)
        return sorted(buckets.values())

    ref = {name: groups(main_coords, {name}) for name in ("tp", "cp", "dp", "pp")}
    ref.update({name: groups(expert_coords, {name}) for name in ("etp", "ep", "edp")})
    ref["dp_cp"] = groups(main_coords, {"dp", "cp"})
    ref["tp_cp"] = groups(main_coords, {"tp", "cp"})
    ref["mp"] = groups(main_coords, {"tp", "pp"})
    ref["tp_dp_cp"] = groups(main_coords, {"tp", "dp", "cp"})
    ref["ep_etp"] = groups(expert_coords, {"ep", "etp"})
    ref["embedding"] = sorted(sorted({g[0], g[-1]}) for g in ref["pp"])
    return ref


LAYOUTS = [  # world, tp, pp, cp, ep, etp
    (1, 1, 1, 1, 1, 1),
    (8, 2, 2, 1, 1, 1),
    (8, 1, 1, 1, 1, 1),
    (8, 8, 1, 1, 1, 1),
    (16, 2, 2, 2, 1, 1),
    (8, 2, 1, 1, 4, 1),
    (16, 2, 2, 1, 2, 2),
    (24, 3, 2, 2, 3, 2),
    (8, 1, 4, 1, 1, 1),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_groups_match_coordinate_reference(layout):
    world, tp, pp, cp, ep, etp = layout
    got = P.rank_groups(world, tensor=tp, pipeline=pp, context=cp, expert=ep, expert_tensor=etp)
    ref = _reference_groups(world, tp, pp, cp, ep, etp)
    assert set(got) == set(ref)
    for name in ref:
        assert sorted(got[name]) == ref[name], name
        for g in got[name]:
            assert g == sorted(g), f"{name} group {g} not in rank order"
        if name != "embedding":  # a partition of the world
            assert sorted(itertools.chain(*got[name])) == list(range(world)), name


def test_tp_is_fastest_varying():
    g = P.rank_groups(8, tensor=2, pipeline=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("world,kwargs,words", [
    (6, dict(tensor=4), ["6", "tensor=4", "4"]),
    (8, dict(tensor=2, pipeline=3), ["8", "pipeline=3", "6"]),
    (8, dict(tensor=2, expert=3), ["expert=3", "8"]),
    (4, dict(tensor=0), ["tensor=0", ">= 1"]),
])
def test_bad_factorization_names_sizes_and_fix(world, kwargs, words):
    with pytest.raises(ConfigError) as err:
        P.rank_groups(world, **kwargs)
    msg = str(err.value)
    for w in words:
        assert w in msg, msg
    assert "choose" in msg or "use" in msg or "launch" in msg


def test_uninitialized_state_is_single_rank():
    assert not P.is_initialized()
    s = P.get_state()
    assert (s.tp_size, s.pp_size, s.dp_size, s.cp_size, s.ep_size) == (1, 1, 1, 1, 1)
    assert (s.tp_rank, s.pp_rank, s.dp_rank) == (0, 0, 0)
    assert s.tp_group is None and s.dp_cp_group is None and s.embedding_group is None
    assert s.is_first_pipeline_stage and s.is_last_pipeline_stage
    assert s.pipeline_next_rank == 0 and s.pipeline_prev_rank == 0


def test_initialize_single_process_without_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    state = P.initialize(backend="gloo")
    try:
        assert state.world_size == 1 and state.tp_size == 1 and state.dp_size == 1
        assert P.get_state() is state
        with pytest.raises(RuntimeError, match="already initialized"):
            P.initialize()
    finally:
        P.destroy()
    assert not dist.is_initialized()  # initialize made the default group, destroy removes it
    assert not P.is_initialized()


def _live_groups(rank, world):
    out = {}
    for layout in (dict(tensor=2, pipeline=2), dict(tensor=1, context=2, expert=2), dict(pipeline=4)):
        state = P.initialize(**layout)
        ref = P.rank_groups(world, **layout)
        for name in ("tp", "pp", "dp", "cp", "ep", "etp", "edp", "dp_cp", "mp", "tp_cp", "ep_etp"):
            mine = next(g for g in ref[name] if rank in g)
            assert dist.get_process_group_ranks(state.group(name)) == mine, (layout, name)
            assert state.size(name) == len(mine) and state.rank_in(name) == mine.index(rank)
        # A sum over dp_cp touches exactly its ranks.
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=state.dp_cp_group)
        assert t.item() == sum(r + 1 for r in state.ranks_of("dp_cp"))
        pp = state.ranks_of("pp")
        assert state.pipeline_next_rank == pp[(pp.index(rank) + 1) % len(pp)]
        assert state.pipeline_prev_rank == pp[(pp.index(rank) - 1) % len(pp)]
        assert state.is_first_pipeline_stage == (rank == pp[0])
        assert state.is_last_pipeline_stage == (rank == pp[-1])
        emb = state.embedding_ranks
        assert emb == sorted({pp[0], pp[-1]})
        assert state.is_in_embedding_group == (rank in emb)
        assert (state.embedding_group is not None) == (rank in emb)
        if rank in emb:
            t = torch.tensor([1.0])
            dist.all_reduce(t, group=state.embedding_group)
            assert t.item() == len(emb)
        out[str(layout)] = state.describe()
        P.destroy()
        assert P.get_state().tp_size == 1
    try:
        P.initialize(tensor=3)
    except ConfigError as e:
        out["error"] = str(e)
    assert not P.is_initialized()
    assert dist.is_initialized()  # a failed initialize leaves the caller's default group alone
    return out


def test_initialize_builds_every_group_on_gloo():
    results = run_distributed(_live_groups, world_size=4)
    assert all("not divisible by tensor=3" in r["error"] for r in results)


def _group_timeouts(rank, world):
    state = P.initialize(timeout_s=3)  # world 2: dp (and edp) span the world and reuse the default group
    seen = {}
    for name, g in state.groups.items():
        if g is None or g == dist.GroupMember.WORLD:
            continue
        seen[name] = g._get_backend(torch.device("cpu")).options._timeout  # what gloo waits for at most
    P.destroy()
    return {name: t.total_seconds() for name, t in seen.items()}


def test_timeout_s_reaches_every_group():
    """torch gives a subgroup its own default timeout, not the default group's: initialize passes it."""
    for seen in run_distributed(_group_timeouts, world_size=2, timeout_s=60):
        assert set(seen) >= {"tp", "pp", "cp", "ep", "etp", "dp_cp", "tp_dp_cp", "mp", "tp_cp", "ep_etp"}, seen
        assert set(seen.values()) == {3.0}, seen


@pytest.mark.parametrize("value", [0, -5, float("nan"), float("inf"), True])
def test_timeout_s_must_be_a_positive_number(value):
    from megacore.config import ParallelConfig

    assert ParallelConfig().timeout_s == 1800.0
    # NaN/inf meet the check every float key gets first (not a finite number); the rest this key's own.
    with pytest.raises(ConfigError, match=r"parallel\.timeout_s=.* (must be a positive number of seconds|is not a "
                                          r"finite number)"):
        ParallelConfig(timeout_s=value).validate()
