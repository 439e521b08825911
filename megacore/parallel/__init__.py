"""Parallelism: topology and process groups, RNG tracker, differentiable collectives, parallelize.

    megacore.parallel.initialize(tensor=2, pipeline=1)      # process groups (DeviceMesh)
    state = megacore.parallel.get_state()                   # sizes, ranks, groups
    megacore.parallel.model_parallel_seed(seed)             # RNG streams
    model = megacore.parallel.build_parallel_gpt(config, seed, sequence_parallel=True)
    ...
    megacore.parallel.destroy()

``full_tensor`` / ``gather_full_state_dict`` live with the layers (megacore.layers.tensor_parallel,
which itself imports this package) and load lazily from here.
"""

from megacore.parallel.collectives import (  # noqa: F401
    all_to_all,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp_last_dim,
)
from megacore.parallel.rng import (  # noqa: F401
    RNGTracker,
    fork,
    get_all_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    replay_context_fn,
    set_all_rng_states,
)
from megacore.parallel.topology import (  # noqa: F401
    ParallelState,
    destroy,
    get_state,
    initialize,
    is_initialized,
    rank_groups,
)

from megacore.parallel.grad_sync import finalize_grads_tp  # noqa: F401,E402

# Last: parallelize imports the layers, which import the modules above. Binding the function here
# also keeps the name ``megacore.parallel.parallelize`` the function, not the submodule.
from megacore.parallel.parallelize import check_tp_config, parallelize, tp_plan  # noqa: F401,E402
from megacore.parallel.build import build_parallel_gpt  # noqa: F401,E402

_LAZY = {
    "full_tensor": "megacore.layers.tensor_parallel",
    "gather_full_state_dict": "megacore.layers.tensor_parallel",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megacore.parallel' has no attribute {name!r}")
