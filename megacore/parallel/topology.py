"""Process topology: the rank arithmetic and every process group, owned in one place.

Rank order (TP fastest-varying, so a tensor-parallel group is neighbouring ranks on one host)::

    rank = ((pp · DP + dp) · CP + cp) · TP + tp          world = PP × DP × CP × TP

Expert (MoE) layers re-fold the same ranks of each pipeline stage as EDP × EP × ETP (ETP fastest)::

    rank = ((pp · EDP + edp) · EP + ep) · ETP + etp     EDP = DP·CP·TP / (EP·ETP)

``rank_groups`` is the pure arithmetic (no processes: tests and tools can call it anywhere).
``initialize`` builds the groups (a ``DeviceMesh`` named ``("pp", "dp", "cp", "tp")`` plus an expert
mesh ``("pp", "edp", "ep", "etp")`` and the composite groups) and ``get_state()`` answers every
question about them. Before ``initialize`` (or after ``destroy``) ``get_state()`` is a single-rank
state: sizes 1, ranks 0, groups ``None``, so one-device code runs unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megacore.config import ConfigError
from megacore.config.support import Facts, check
from megacore.layers.rng import get_rng_tracker

MAIN_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")

# Composite groups: name -> the mesh dims it spans (ranks in natural rank order).
COMPOSITE_GROUPS = {
    "dp_cp": ("main", ("dp", "cp")),        # gradient reduction of dense params
    "tp_cp": ("main", ("cp", "tp")),
    "mp": ("main", ("pp", "tp")),           # model-parallel: grad-norm / found-inf reductions
    "tp_dp_cp": ("main", ("dp", "cp", "tp")),  # every rank of one pipeline stage
    "ep_etp": ("expert", ("ep", "etp")),    # expert model-parallel
}


def _check_sizes(world_size: int, tensor: int, pipeline: int, context: int, expert: int, expert_tensor: int,
                 virtual_pipeline: Optional[int] = None) -> int:
    """Return the data-parallel size, or raise the ConfigError of the support table's mesh rules
    (``megacore.config.support``: sizes >= 1, their product divides the world, the expert folding
    divides a pipeline stage) that names the sizes and the fix."""
    check(Facts(world_size=world_size, tensor=tensor, pipeline=pipeline, context=context, expert=expert,
                expert_tensor=expert_tensor, virtual_pipeline=virtual_pipeline))
    return world_size // (tensor * pipeline * context)


def _groups_over(ranks: torch.Tensor, dims: tuple[int, ...]) -> list[list[int]]:
    """Split the rank grid into groups that vary along ``dims`` (all other coordinates fixed)."""
    other = [d for d in range(ranks.dim()) if d not in dims]
    size = 1
    for d in dims:
        size *= ranks.shape[d]
    return ranks.permute(*other, *dims).reshape(-1, size).tolist()


def rank_groups(world_size: int, tensor: int = 1, pipeline: int = 1, context: int = 1, expert: int = 1,
                expert_tensor: int = 1) -> dict[str, list[list[int]]]:
    """Every group of the layout as lists of global ranks (pure arithmetic, no processes).

    Keys: ``tp, cp, dp, pp`` (main mesh dims), ``etp, ep, edp`` (expert mesh dims), the composites
    ``dp_cp, tp_cp, mp (pp×tp), tp_dp_cp, ep_etp``, and ``embedding``: the first and last rank of each
    pipeline group (one rank when PP=1), whose tied-embedding gradients are summed.
    """
    dp = _check_sizes(world_size, tensor, pipeline, context, expert, expert_tensor)
    main = torch.arange(world_size).view(pipeline, dp, context, tensor)
    edp = world_size // (pipeline * expert * expert_tensor)
    expert_grid = torch.arange(world_size).view(pipeline, edp, expert, expert_tensor)
    grids = {"main": (main, MAIN_DIMS), "expert": (expert_grid, EXPERT_DIMS)}
    out: dict[str, list[list[int]]] = {}
    for grid, names in grids.values():
        for i, name in enumerate(names):
            if name not in out:
                out[name] = _groups_over(grid, (i,))
    for name, (which, dims) in COMPOSITE_GROUPS.items():
        grid, names = grids[which]
        out[name] = _groups_over(grid, tuple(names.index(d) for d in dims))
    out["embedding"] = [sorted({g[0], g[-1]}) for g in out["pp"]]
    return out


@dataclass
class ParallelState:
    """Sizes, ranks and groups of one process in the layout (see the module docstring).

    Groups are ``torch.distributed`` process groups, or ``None`` in the single-rank (uninitialized)
    state. ``*_size``/``*_rank`` follow the group names: ``tp pp dp cp ep etp edp``; ``dp_cp``
    (gradient reduction), ``mp`` (tensor x pipeline), ``embedding`` (first + last pipeline stage).
    """

    initialized: bool = False
    world_size: int = 1
    rank: int = 0
    backend: Optional[str] = None
    device_type: str = "cpu"
    sizes: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    group_ranks: dict = field(default_factory=dict)   # name -> the global ranks of MY group
    mesh: object = None            # DeviceMesh ("pp", "dp", "cp", "tp")
    expert_mesh: object = None     # DeviceMesh ("pp", "edp", "ep", "etp")
    virtual_pipeline_size: Optional[int] = None
    virtual_pipeline_rank: Optional[int] = None   # set by the pipeline schedule while it runs a model chunk
    owns_default_group: bool = False
    timeout_s: Optional[float] = None   # the collective timeout of every group (groups made later too)

    # -- generic lookups -------------------------------------------------------------------------
    def size(self, name: str) -> int:
        return self.sizes.get(name, 1)

    def rank_in(self, name: str) -> int:
        return self.ranks.get(name, 0)

    def group(self, name: str):
        return self.groups.get(name)

    def ranks_of(self, name: str) -> list[int]:
        return self.group_ranks.get(name, [self.rank])

    # -- named accessors (the common questions) ----------------------------------------------------
    tp_group = property(lambda s: s.group("tp"))
    pp_group = property(lambda s: s.group("pp"))
    dp_group = property(lambda s: s.group("dp"))
    cp_group = property(lambda s: s.group("cp"))
    ep_group = property(lambda s: s.group("ep"))
    etp_group = property(lambda s: s.group("etp"))
    edp_group = property(lambda s: s.group("edp"))
    dp_cp_group = property(lambda s: s.group("dp_cp"))
    tp_cp_group = property(lambda s: s.group("tp_cp"))
    mp_group = property(lambda s: s.group("mp"))
    ep_etp_group = property(lambda s: s.group("ep_etp"))
    embedding_group = property(lambda s: s.group("embedding"))
    tp_size = property(lambda s: s.size("tp"))
    pp_size = property(lambda s: s.size("pp"))
    dp_size = property(lambda s: s.size("dp"))
    cp_size = property(lambda s: s.size("cp"))
    ep_size = property(lambda s: s.size("ep"))
    etp_size = property(lambda s: s.size("etp"))
    edp_size = property(lambda s: s.size("edp"))
    dp_cp_size = property(lambda s: s.size("dp_cp"))
    mp_size = property(lambda s: s.size("mp"))
    tp_rank = property(lambda s: s.rank_in("tp"))
    pp_rank = property(lambda s: s.rank_in("pp"))
    dp_rank = property(lambda s: s.rank_in("dp"))
    cp_rank = property(lambda s: s.rank_in("cp"))
    ep_rank = property(lambda s: s.rank_in("ep"))
    etp_rank = property(lambda s: s.rank_in("etp"))
    edp_rank = property(lambda s: s.rank_in("edp"))
    dp_cp_rank = property(lambda s: s.rank_in("dp_cp"))

    # -- pipeline ---------------------------------------------------------------------------------
    @property
    def is_first_pipeline_stage(self) -> bool:
        """First physical stage (ignores virtual chunks; see ``is_first_virtual_stage``)."""
        return self.pp_rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_first_virtual_stage(self) -> bool:
        """First model chunk of the whole pipeline: physical stage 0 running virtual chunk 0."""
        return self.is_first_pipeline_stage and (self.virtual_pipeline_rank or 0) == 0

    @property
    def is_last_virtual_stage(self) -> bool:
        last_chunk = (self.virtual_pipeline_size or 1) - 1
        return self.is_last_pipeline_stage and (self.virtual_pipeline_rank or 0) == last_chunk

    @property
    def pipeline_next_rank(self) -> int:
        """Global rank of the next stage (wraps around, as interleaved schedules need)."""
        ranks = self.ranks_of("pp")
        return ranks[(self.pp_rank + 1) % len(ranks)]

    @property
    def pipeline_prev_rank(self) -> int:
        ranks = self.ranks_of("pp")
        return ranks[(self.pp_rank - 1) % len(ranks)]

    @property
    def embedding_ranks(self) -> list[int]:
        return self.ranks_of("embedding")

    @property
    def is_in_embedding_group(self) -> bool:
        return self.rank in self.embedding_ranks

    def describe(self) -> str:
        dims = " ".join(f"{n}={self.size(n)}" for n in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"))
        return f"rank {self.rank}/{self.world_size} [{dims}] coords " + " ".join(
            f"{n}:{self.rank_in(n)}" for n in ("tp", "cp", "dp", "pp"))


_STATE: Optional[ParallelState] = None
_SINGLE = ParallelState()


def get_state() -> ParallelState:
    """The current layout, or a single-rank state (sizes 1, groups None) before ``initialize``."""
    return _STATE if _STATE is not None else _SINGLE


def is_initialized() -> bool:
    return _STATE is not None


_GROUP_TIMEOUT_S: Optional[float] = None  # the collective timeout init_default_group gave the default group


def _timeout(timeout_s: Optional[float]) -> Optional[datetime.timedelta]:
    return None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))


def init_default_group(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> bool:
    """Initialize torch.distributed from env (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) if needed.

    Without RANK/WORLD_SIZE in the environment a one-process group is made on an in-memory store.
    ``timeout_s``: how long a collective may wait for the other ranks (torch's default when None;
    ``initialize`` gives every group of the layout the same). Returns True when this call created
    the default group.
    """
    global _GROUP_TIMEOUT_S
    if dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if timeout_s is None else {"timeout": _timeout(timeout_s)}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, init_method="env://", **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    _GROUP_TIMEOUT_S = timeout_s
    return True


def _mesh_timeouts(backend_name: str, dims: tuple[str, ...], shape: tuple[int, ...], world: int,
                   timeout_s: Optional[float]) -> dict:
    """``backend_override`` giving the mesh groups the collective timeout (DeviceMesh passes an
    option's ``_timeout`` to ``new_group``; without it a subgroup gets torch's default, not the default
    group's). A dim spanning the world reuses the default group, which has the timeout already."""
    if timeout_s is None:
        return {}
    backend_class = getattr(dist, "ProcessGroupNCCL" if "nccl" in backend_name else "ProcessGroupGloo", None)
    make = getattr(backend_class, "Options", None) if "nccl" in backend_name else getattr(backend_class, "_Options", None)
    if make is None:  # a backend without options: its groups keep torch's default timeout
        return {}
    out = {}
    for name, size in zip(dims, shape):
        if size == world:
            continue
        options = make()
        options._timeout = _timeout(timeout_s)
        out[name] = options
    return out


def _make_groups(lists: list[list[int]], rank: int, timeout_s: Optional[float] = None):
    """Create one group per list (collective: every rank calls with the same lists); return mine."""
    mine, _ = dist.new_subgroups_by_enumeration(lists, timeout=_timeout(timeout_s))
    if mine is None:  # cannot happen for a partition of the world, but be explicit
        raise RuntimeError(f"rank {rank} is in none of the groups {lists}")
    return mine


def initialize(tensor: int = 1, pipeline: int = 1, context: int = 1, expert: int = 1,
               virtual_pipeline: Optional[int] = None, expert_tensor: int = 1,
               backend: Optional[str] = None, timeout_s: Optional[float] = None) -> ParallelState:
    """Build every process group of the layout and make it the current state; returns it.

    Uses the already-initialized default group, or initializes one from the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without them a one-process group): ``backend`` applies only
    then and defaults to nccl with CUDA, else gloo. Groups live on cuda for nccl, cpu otherwise.
    ``expert``/``expert_tensor`` re-fold each pipeline stage's ranks for MoE layers (EDP is what is
    left). ``virtual_pipeline`` is recorded for the pipeline schedules. ``timeout_s``: how long a
    collective on any group may wait for the other ranks (default: what ``init_default_group`` was
    given, else torch's default). Calling it again without ``destroy()`` first is an error.
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError("megacore.parallel is already initialized; call megacore.parallel.destroy() first")
    owns = init_default_group(backend, timeout_s)
    if timeout_s is None:
        timeout_s = _GROUP_TIMEOUT_S
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        _check_sizes(world, tensor, pipeline, context, expert, expert_tensor, virtual_pipeline)
        lists = rank_groups(world, tensor, pipeline, context, expert, expert_tensor)
    except ConfigError:
        if owns:
            dist.destroy_process_group()
        raise
    backend_name = str(dist.get_backend())
    device_type = "cuda" if "nccl" in backend_name else "cpu"
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    dp = world // (tensor * pipeline * context)
    shape = (pipeline, dp, context, tensor)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MAIN_DIMS,
                            backend_override=_mesh_timeouts(backend_name, MAIN_DIMS, shape, world, timeout_s))
    edp = world // (pipeline * expert * expert_tensor)
    expert_shape = (pipeline, edp, expert, expert_tensor)
    expert_timeouts = _mesh_timeouts(backend_name, EXPERT_DIMS, expert_shape, world, timeout_s)
    expert_mesh = DeviceMesh(device_type, torch.arange(world).view(*expert_shape), mesh_dim_names=EXPERT_DIMS,
                             backend_override=tuple((None, expert_timeouts[n]) if n in expert_timeouts else (None, None)
                                                    for n in EXPERT_DIMS))
    groups, group_ranks = {}, {}
    for m, names in ((mesh, MAIN_DIMS), (expert_mesh, EXPERT_DIMS)):
        for name in names:
            if name in groups:
                continue
            g = m.get_group(name)
            got = dist.get_process_group_ranks(g)
            want = next(lst for lst in lists[name] if rank in lst)
            if got != want:  # the mesh must agree with the documented arithmetic
                raise RuntimeError(f"DeviceMesh group {name} of rank {rank} is {got}, expected {want}")
            groups[name], group_ranks[name] = g, got
    for name in COMPOSITE_GROUPS:
        groups[name] = _make_groups(lists[name], rank, timeout_s)
        group_ranks[name] = next(lst for lst in lists[name] if rank in lst)
    # Embedding groups (first + last stage of each pipeline group) do not cover middle stages, so
    # they are made one by one; every rank takes part in creating every group.
    my_pp = next(i for i, lst in enumerate(lists["pp"]) if rank in lst)
    groups["embedding"] = None
    for i, lst in enumerate(lists["embedding"]):
        g = dist.new_group(lst, timeout=_timeout(timeout_s))
        if rank in lst:
            groups["embedding"] = g
    group_ranks["embedding"] = lists["embedding"][my_pp]
    sizes = {name: len(r) for name, r in group_ranks.items()}
    ranks = {name: r.index(rank) if rank in r else 0 for name, r in group_ranks.items()}
    _STATE = ParallelState(initialized=True, world_size=world, rank=rank, backend=backend_name,
                           device_type=device_type, sizes=sizes, ranks=ranks, groups=groups,
                           group_ranks=group_ranks, mesh=mesh, expert_mesh=expert_mesh,
                           virtual_pipeline_size=virtual_pipeline, owns_default_group=owns, timeout_s=timeout_s)
    return _STATE


def context_subgroup_ranks(cp_groups: list[list[int]], a2a_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(all-to-all groups, ring groups) of ``parallel.context_mode=a2a+ring`` (pure arithmetic): each
    CP group (ranks in CP order) cut into all-to-all groups of ``a2a_size`` consecutive CP ranks, and
    ring groups joining the ranks at the same place of each all-to-all group (the ranks holding the
    same heads after the all-to-all)."""
    a2a, ring = [], []
    for ranks in cp_groups:
        if len(ranks) % a2a_size:
            raise ConfigError(f"parallel.context_a2a_size={a2a_size} does not divide parallel.context={len(ranks)}; "
                              "choose a divisor of the context-parallel size")
        a2a += [ranks[i:i + a2a_size] for i in range(0, len(ranks), a2a_size)]
        ring += [ranks[j::a2a_size] for j in range(a2a_size)]
    return a2a, ring


def context_subgroups(a2a_size: int, cp_group=None):
    """This rank's (all-to-all group, ring group) for ``a2a+ring`` context parallelism
    (``context_subgroup_ranks`` of the current layout). Made on the first call and kept with the
    layout's groups (``destroy`` destroys them): collective, every rank of the world calls it with
    the same size. ``cp_group``, when given, must be the layout's CP group."""
    state = get_state()
    if not state.initialized:
        raise RuntimeError("context_subgroups needs the process groups: call megacore.parallel.initialize first")
    if cp_group is not None and cp_group is not state.cp_group:
        raise ValueError("a2a+ring context parallelism splits the CP group of megacore.parallel.get_state(); "
                         "pass state.cp_group")
    if isinstance(a2a_size, bool) or not isinstance(a2a_size, int) or a2a_size < 1:
        raise ConfigError(f"parallel.context_a2a_size={a2a_size!r}: a2a+ring needs the all-to-all group size, a "
                          "positive divisor of parallel.context; set parallel.context_a2a_size, e.g. 2")
    if "cp_a2a" in state.groups:
        if state.sizes["cp_a2a"] != a2a_size:
            raise ValueError(f"the a2a+ring groups of this layout have {state.sizes['cp_a2a']} ranks, not {a2a_size}; "
                             "one layout has one all-to-all size")
        return state.groups["cp_a2a"], state.groups["cp_ring"]
    cp_lists = rank_groups(state.world_size, state.tp_size, state.pp_size, state.cp_size, state.ep_size,
                           state.etp_size)["cp"]
    for name, lists in zip(("cp_a2a", "cp_ring"), context_subgroup_ranks(cp_lists, a2a_size)):
        state.groups[name] = _make_groups(lists, state.rank, state.timeout_s)
        state.group_ranks[name] = next(lst for lst in lists if state.rank in lst)
        state.sizes[name] = len(state.group_ranks[name])
        state.ranks[name] = state.group_ranks[name].index(state.rank)
    return state.groups["cp_a2a"], state.groups["cp_ring"]


_ON_DESTROY: list = []


def on_destroy(forget) -> None:
    """Register ``forget()`` to run when ``destroy()`` tears the layout down (state tied to its groups)."""
    if forget not in _ON_DESTROY:
        _ON_DESTROY.append(forget)


# initialize()'s size arguments -> the group whose size each one sets.
AXIS_GROUPS = {"tensor": "tp", "pipeline": "pp", "context": "cp", "expert": "ep", "expert_tensor": "etp"}


def layout_mismatches(state: ParallelState, sizes: dict) -> list[str]:
    """What differs between the layout ``sizes`` asked for (``initialize``'s keyword arguments,
    e.g. ``ParallelConfig.mesh_sizes()``) and the groups of ``state``: one line per axis, empty when
    they agree. Axes left out of ``sizes`` are expected to be 1."""
    unknown = set(sizes) - set(AXIS_GROUPS) - {"virtual_pipeline"}
    if unknown:
        raise ValueError(f"unknown layout axes {sorted(unknown)}; known: {sorted(AXIS_GROUPS)} and virtual_pipeline")
    out = [f"{axis}={sizes.get(axis, 1)} but the {group} group has {state.size(group)} ranks"
           for axis, group in AXIS_GROUPS.items() if state.size(group) != sizes.get(axis, 1)]
    if (sizes.get("virtual_pipeline") or 1) != (state.virtual_pipeline_size or 1):
        out.append(f"virtual_pipeline={sizes.get('virtual_pipeline')} but the state records "
                   f"{state.virtual_pipeline_size}")
    return out


def describe_layout(state: ParallelState) -> str:
    """The layout of ``state`` in words, read from its groups: ``world 4 = tensor 2 x pipeline 1 x data 2``,
    plus context when > 1 and the expert folding when experts are split."""
    text = (f"world {state.world_size} = tensor {state.tp_size} x pipeline {state.pp_size} x "
            f"{f'context {state.cp_size} x ' if state.cp_size > 1 else ''}data {state.dp_size}")
    if state.ep_size > 1 or state.etp_size > 1:
        text += (f"; experts split over {state.ep_size} ranks (expert {state.ep_size} x expert-tensor "
                 f"{state.etp_size} x expert-data {state.edp_size} per stage)")
    return text


def destroy() -> None:
    """Forget the layout and destroy its groups (and the default group if ``initialize`` made it)."""
    global _STATE
    state, _STATE = _STATE, None
    if state is None:
        return
    get_rng_tracker().reset()
    for forget in _ON_DESTROY:  # e.g. the copy-engine workspaces, which belong to the groups destroyed below
        forget()
    if not dist.is_initialized():
        return
    if state.owns_default_group:
        dist.destroy_process_group()  # destroys every subgroup too
        return
    seen: set[int] = set()
    for g in state.groups.values():
        # DeviceMesh reuses the default group for a dim spanning the world: never destroy that.
        if g is None or id(g) in seen or g == dist.GroupMember.WORLD:
            continue
        seen.add(id(g))
        try:
            dist.destroy_process_group(g)
        except (ValueError, RuntimeError):  # already gone (e.g. shared with a mesh that tore it down)
            pass
