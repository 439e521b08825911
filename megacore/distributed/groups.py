"""The data-parallel-related process groups of the current ``megacore.parallel`` layout.

    g = parallel_groups()
    ddp = DistributedDataParallel(model, g["dp_group"], expert_dp_group=g["expert_dp_group"], ...)
    opt = DistributedOptimizer(ddp, model_parallel_groups=g["model_parallel_groups"], tp_group=g["tp_group"], ...)

* gradients of dense params are summed over DP x CP (``dp_cp``): context-parallel ranks hold the same
  weights and see different tokens, exactly like data-parallel ranks;
* expert params over expert-DP (``edp``);
* the grad norm and found_inf are reduced over TP and PP (plus the DP group for sharded state,
  which the distributed optimizer adds itself).

Before ``megacore.parallel.initialize`` every entry is None / empty: DDP then uses WORLD (or no
communication without torch.distributed) and the norm needs no model-parallel reduction.
"""

from __future__ import annotations


def parallel_groups() -> dict:
    """``dp_group``, ``expert_dp_group``, ``model_parallel_groups`` and ``tp_group`` of the layout."""
    from megacore.parallel.topology import get_state

    st = get_state()
    if not st.initialized:
        return {"dp_group": None, "expert_dp_group": None, "model_parallel_groups": (), "tp_group": None}
    return {"dp_group": st.group("dp_cp"), "expert_dp_group": st.group("edp"),
            "model_parallel_groups": (st.group("tp"), st.group("pp")), "tp_group": st.group("tp")}
