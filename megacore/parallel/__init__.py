"""Parallelism: topology and process groups, RNG streams, differentiable collectives, and the plans
(tensor/sequence, expert and context parallelism) that ``megacore.compose`` applies to a one-device model.

    megacore.parallel.initialize(tensor=2, pipeline=1)      # process groups (DeviceMesh)
    state = megacore.parallel.get_state()                   # sizes, ranks, groups
    megacore.parallel.model_parallel_seed(seed)             # RNG streams
    megacore.parallel.parallelize(model_on_meta, sequence_parallel=True)   # the TP/SP plan
    ...
    megacore.parallel.destroy()

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
from megacore.parallel.parallelize import check_tp_config, parallelize, parallelize_llava, tp_plan  # noqa: F401,E402

from megacore.parallel.tensor_parallel import full_tensor, gather_full_state_dict  # noqa: F401,E402
