"""Per-rank random number generator state: Python, NumPy, torch CPU, CUDA and megacore's RNG tracker.

Restored only when the checkpoint was written with the same world size and parallel layout: an RNG
stream belongs to one rank's position in the layout, and after resharding there is no meaningful
owner, so the caller gets ``rng_restored=False`` with the reason instead.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch


def _tracker():
    """megacore.parallel's RNG tracker (named streams, e.g. the tensor-parallel one), if importable."""
    try:
        from megacore.parallel.rng import get_rng_tracker
    except Exception:  # megacore.parallel unavailable: no tracker streams to save
        return None
    return get_rng_tracker()


def capture_rng() -> dict[str, Any]:
    """This rank's generator states (tensors stay tensors; see serialize.to_json_tree)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    tracker = _tracker()
    if tracker is not None and tracker.names():
        state["tracker"] = tracker.get_states()
    return state


def check_rng_state(state: Any) -> None:
    """Raise ValueError unless ``state`` has the shape ``capture_rng`` gives, so that ``restore_rng``
    (run only after every rank agreed to load) cannot fail half-way on a damaged state."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"expected the keys python, numpy, torch; got {got}")
    random.Random().setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, value in [("torch", state["torch"]), *(("cuda", s) for s in state.get("cuda") or [])]:
        if not torch.is_tensor(value) or value.dim() != 1:
            raise ValueError(f"the {name} generator state is not a 1-d tensor")
    tracker = state.get("tracker")
    if tracker is not None and not isinstance(tracker, dict):
        raise ValueError("the RNG tracker states are not a dict")


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
    tracker = _tracker()
    if tracker is not None and state.get("tracker"):
        tracker.set_states(state["tracker"])


def current_layout() -> Optional[dict]:
    """Group sizes of the megacore.parallel layout (None when it is not initialized)."""
    try:
        from megacore.parallel.topology import get_state, is_initialized
    except Exception:  # megacore.parallel unavailable: no layout beyond the world size
        return None
    if not is_initialized():
        return None
    state = get_state()
    return {"sizes": {str(k): int(v) for k, v in sorted(state.sizes.items())},
            "virtual_pipeline": state.virtual_pipeline_size}
