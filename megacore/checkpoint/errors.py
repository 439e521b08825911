"""The one exception type of the checkpoint package."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message names the problem and the fix.

    Subclasses ``ValueError`` so callers that treat bad input generically still catch it.
    """
