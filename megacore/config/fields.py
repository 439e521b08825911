"""``doc``: a config field declared together with its documentation.

    tensor: int = doc(1, "Tensor-parallel size: ranks that split each layer's weights.")

The text rides in the field's metadata (read back by :func:`field_doc`), so it lives once, beside
the field: ``megacore train --help`` (``megacore.config.help``) lists every key with its type,
default and this text, and a test requires one for every field of every section.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Iterator, Optional


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Optional[Callable[[], Any]] = None):
    """A dataclass field with default ``default`` (or ``default_factory=factory``) documented by ``text``."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def field_doc(f: dataclasses.Field) -> str:
    """The documentation of dataclass field ``f`` ("" when it has none)."""
    return f.metadata.get("doc", "")


def walk_fields(cls, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, annotated type)`` of every field of dataclass ``cls``, depth first: a
    section (a dataclass-typed field) comes before its own keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        yield prefix + f.name, f, tp
        if dataclasses.is_dataclass(tp):
            yield from walk_fields(tp, f"{prefix}{f.name}.")
