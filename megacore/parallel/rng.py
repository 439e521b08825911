"""RNG tracker: named random streams so dropout is identical where activations are replicated and
different where they are split, and replays exactly under activation recomputation.

Streams and their seeds (``model_parallel_seed(seed)``)::

    default            seed + 100 · pp_rank                    (the ordinary torch generator)
    "tensor-parallel"  seed + 2718 + tp_rank                   (used inside ``fork("tensor-parallel")``)
    "expert-parallel"  seed + 2718 + 1024 + 100 · ep_rank + etp_rank

* The default stream is identical on every tensor-, data- and context-parallel rank of a stage, so
  dropout on replicated activations (after a row-parallel all-reduce) draws the same mask on all TP
  ranks, as it must. Pipeline stages are offset so they do not draw correlated masks.
* The tensor-parallel stream differs per TP rank: dropout on a TP-split activation (attention
  probabilities of the local heads, sequence-parallel shards) draws independent masks per shard.
  The constant 2718 only separates it from the default stream; the rule is Megatron-Core's.

A stream is the state of the device's default generator (CPU generator for CPU tensors, the current
CUDA device's generator for CUDA tensors). ``fork(name)`` swaps the named state in, runs the body,
stores the advanced state back and restores the caller's state.

The tracker, ``fork`` and the RNG-replaying ``checkpoint`` live with the layers
(``megacore.layers.rng``) and are re-exported here; this module owns the stream names and how each
rank seeds them.
"""

from __future__ import annotations

import torch

from megacore.layers import rng as _streams
from megacore.layers.rng import (  # noqa: F401  (the tracker API, for callers of megacore.parallel.rng)
    RNGTracker,
    checkpoint,
    get_all_rng_states,
    get_rng_tracker,
    replay_context_fn,
    set_all_rng_states,
    stream_seed,
)

TP_STREAM = "tensor-parallel"
EP_STREAM = "expert-parallel"
TP_SEED_OFFSET = 2718
EP_SEED_OFFSET = 1024
PP_SEED_STRIDE = 100


def fork(name: str = TP_STREAM):
    """``with fork():`` draws from the tensor-parallel stream (``megacore.layers.rng.fork``); a no-op
    context while no stream is registered (one device)."""
    return _streams.fork(name)


def model_parallel_seed(seed: int) -> None:
    """Seed the default generator and register the tensor- and expert-parallel streams.

    Uses the ranks of ``megacore.parallel.get_state()`` (all 0 on a single device).
    """
    from megacore.parallel.topology import get_state

    state = get_state()
    torch.manual_seed(seed + PP_SEED_STRIDE * state.pp_rank)
    get_rng_tracker().reset()
    get_rng_tracker().add(TP_STREAM, seed + TP_SEED_OFFSET + state.tp_rank)
    get_rng_tracker().add(EP_STREAM, seed + TP_SEED_OFFSET + EP_SEED_OFFSET + PP_SEED_STRIDE * state.ep_rank + state.etp_rank)
