"""This rank's share of a global batch in the layout-equivalence tests: its data-parallel rows and,
under context parallelism, its load-balanced sequence chunks with their position ids."""

from __future__ import annotations

import numpy as np
import torch


def rank_batch(ids: torch.Tensor, labels: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids, labels, forward kwargs) of this rank, from the global [B, S] batch and the parallel state."""
    from megacore.parallel.context_parallel import split_sample_for_cp

    per = ids.shape[0] // state.dp_size
    rows = slice(state.dp_rank * per, (state.dp_rank + 1) * per)
    ids, labels = ids[rows], labels[rows]
    if state.cp_size == 1:
        return ids, labels, {}
    local = [split_sample_for_cp({"tokens": ids[b].numpy(), "labels": labels[b].numpy()}, state.cp_size,
                                 state.cp_rank) for b in range(per)]
    ids, labels, positions = (torch.from_numpy(np.stack([s[k] for s in local]))
                              for k in ("tokens", "labels", "position_ids"))
    return ids, labels, {"position_ids": positions}
