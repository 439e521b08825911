"""What a failed collective says about the other ranks, in one line.

A collective that times out (``parallel.timeout_s``) or loses its connection means another rank
stalled (stopped, hung, swapped out) or died; the backend says so in a long message of its own
(gloo: ``Timed out waiting 10000ms for recv operation``, ``Connection closed by peer``; NCCL: a
``DistBackendError``). ``describe_collective_failure`` turns such an error into the line the
worker prints before it exits, naming this rank and the step it had reached; the launcher then
stops the other ranks and names the one that stalled (``megacore.launcher``).
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

_TIMEOUT = ("timed out", "timeout")
_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
         "socket closed", "end of file")


def collective_failure_kind(error: BaseException) -> Optional[str]:
    """``"timeout"``, ``"lost"`` (a peer's connection went away) or ``"backend"`` (another error of the
    communication backend); None for an error that is not a failed collective."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    if any(mark in text for mark in _TIMEOUT):
        return "timeout"
    if any(mark in text for mark in _LOST):
        return "lost"
    if isinstance(error, getattr(dist, "DistError", ())):
        return "backend"
    return None


def describe_collective_failure(error: BaseException, rank: int, step: int, timeout_s: float) -> Optional[str]:
    """One line for a failed collective on ``rank`` during step ``step`` (1-based; 0: before the
    first step), or None when ``error`` is not one."""
    kind = collective_failure_kind(error)
    where = f"at step {step}" if step > 0 else "before the first step"
    if kind == "timeout":
        return (f"rank {rank}: collective timed out after {timeout_s:g} s {where} (parallel.timeout_s={timeout_s:g}): "
                "another rank stalled or died; the job stops")
    if kind == "lost":
        return f"rank {rank}: lost the connection to another rank {where}: that rank died; the job stops"
    if kind == "backend":
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return f"rank {rank}: collective failed {where} ({type(error).__name__}: {first}); the job stops"
    return None
