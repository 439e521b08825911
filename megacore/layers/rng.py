"""Named random streams, and activation checkpointing that replays them.

A stream is the state of the device's default generator (CPU generator for CPU tensors, the current
CUDA device's generator for CUDA tensors). ``fork(name)`` swaps the named state in, runs the body,
stores the advanced state back and restores the caller's state. Which streams exist and how they
are seeded per rank is the parallel side's business (``megacore.parallel.rng.model_parallel_seed``);
the layers only draw from a stream they are handed (e.g. ``CoreAttention.rng_context``).

Recomputation: ``torch.utils.checkpoint`` restores the *default* generator before re-running the
forward, but not the tracker's saved streams. ``checkpoint(fn, *args)`` here (or passing
``context_fn=replay_context_fn`` to ``torch.utils.checkpoint.checkpoint`` with
``use_reentrant=False``) also snapshots the tracker at forward time and replays it during the
recompute, then puts the streams back where the forward left them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint as _torch_checkpoint


def _device_states() -> dict[str, torch.Tensor]:
    """The default generators' states: CPU always, the current CUDA device when CUDA is initialized."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_device_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _seeded_states(seed: int) -> dict[str, torch.Tensor]:
    """Device states of a generator seeded with ``seed``, without touching the current ones.

    Not via ``torch.manual_seed``: before CUDA is initialized that only queues a CUDA seed, which
    would then override the default CUDA stream at initialization. A stream made before CUDA
    exists gets its CUDA state later, from the same seed (``RNGTracker._complete``).
    """
    states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = _cuda_seeded_state(seed)
    return states


def _cuda_seeded_state(seed: int) -> torch.Tensor:
    """The current CUDA device's generator state after seeding with ``seed`` (current state kept)."""
    saved = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(seed)
    state = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(saved)
    return state


class RNGTracker:
    """Named RNG streams (see the module docstring). One instance per process: ``get_rng_tracker()``."""

    def __init__(self):
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: dict[str, int] = {}

    def reset(self) -> None:
        self._states, self._seeds = {}, {}

    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Register stream ``name`` seeded with ``seed``. Names and seeds must be unique."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() or model_parallel_seed() again")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream; streams need distinct seeds")
        self._states[name] = _seeded_states(seed)
        self._seeds[name] = seed

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every stream's state (for checkpoints and for recompute replay)."""
        return {name: {dev: t.clone() for dev, t in st.items()} for name, st in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace the streams by ``states`` (as returned by ``get_states``)."""
        self._states = {name: {dev: t.clone() for dev, t in st.items()} for name, st in states.items()}

    def _complete(self, name: str) -> dict[str, torch.Tensor]:
        """The stream's states, adding the CUDA one (from the stream's seed) once CUDA is in use.

        Streams registered before CUDA was initialized hold only the CPU state; without this a
        CUDA dropout inside ``fork`` would silently use the caller's (TP-identical) stream.
        """
        st = self._states[name]
        if "cuda" not in st and torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = _cuda_seeded_state(self._seeds.get(name, 0))
        return st

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Run the body with stream ``name`` as the default generator state, then restore."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} is not registered (known: {self.names()}); "
                           "call megacore.parallel.model_parallel_seed(seed) after initialize()")
        caller = _device_states()
        _set_device_states(self._complete(name))
        try:
            yield
        finally:
            self._states[name] = _device_states()
            _set_device_states(caller)


_TRACKER = RNGTracker()


def get_rng_tracker() -> RNGTracker:
    return _TRACKER


def fork(name: str):
    """``with fork("tensor-parallel"):`` — shorthand for ``get_rng_tracker().fork(name)``.

    Without registered streams (single device, ``model_parallel_seed`` never called) it is a no-op
    context, so layers can always use it.
    """
    if name not in _TRACKER._states and not _TRACKER._states:
        return contextlib.nullcontext()
    return _TRACKER.fork(name)


def get_all_rng_states() -> dict:
    """Default generator states plus every tracker stream (what a checkpoint saves)."""
    return {"default": _device_states(), "tracker": _TRACKER.get_states()}


def set_all_rng_states(states: dict) -> None:
    _set_device_states(states["default"])
    _TRACKER.set_states(states["tracker"])


def replay_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    The forward context snapshots the tracker's streams; the recompute context installs that
    snapshot for the re-run and afterwards restores the streams the recompute found (so recompute
    does not consume randomness of later forwards). The default generator is handled by
    ``torch.utils.checkpoint`` itself (``preserve_rng_state=True``).
    """
    snapshot: dict = {}

    @contextlib.contextmanager
    def forward_ctx():
        snapshot["states"] = _TRACKER.get_states()
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        current = _TRACKER.get_states()
        _TRACKER.set_states(snapshot["states"])
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return forward_ctx(), recompute_ctx()


def checkpoint(fn: Callable, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) that also replays the tracker's streams."""
    return _torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=replay_context_fn, **kwargs)


def stream_seed(name: str) -> Optional[int]:
    """The seed stream ``name`` was registered with (None if unknown)."""
    return _TRACKER._seeds.get(name)
