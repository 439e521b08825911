"""Every config key with its type, default and documentation, from the dataclasses themselves.

``megacore train --help`` and ``megacore config --help`` print :func:`render_keys`; the text of each key
is the field's ``doc`` (``megacore.config.fields``), so it cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any, NamedTuple

from megacore.config.fields import field_doc, walk_fields
from megacore.config.run import RunConfig


class KeyDoc(NamedTuple):
    key: str          # dotted, e.g. "log.wandb.project"
    type: str         # "int", "str or null", ...; "section" for a section
    default: str      # as YAML writes it: null, true, 1e-08, [core_attn]
    doc: str


def type_name(tp: Any) -> str:
    """``int``, ``float``, ``str``, ``bool``, ``list``; ``X or null`` for ``Optional[X]``."""
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " or null"
    if typing.get_origin(tp) is list:
        return "list"
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any) -> str:
    """A default as it would be written in a YAML config (and on the command line)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def config_keys(cls=RunConfig) -> list[KeyDoc]:
    """Every key of ``cls`` (sections included, depth first), documented."""
    out = []
    for key, f, tp in walk_fields(cls):
        if dataclasses.is_dataclass(tp):
            out.append(KeyDoc(key, "section", "", field_doc(f)))
        else:
            out.append(KeyDoc(key, type_name(tp), default_text(_default(f)), field_doc(f)))
    return out


INTRO = """\
Config keys. Set them in the YAML file (a section per mapping: `train:` then `iters: 100`) or on
the command line as dotted.key=value (train.iters=100 log.wandb.project=demo); the command line
wins. Lists: [a, b] or a,b. null clears an optional key. An unknown key is an error."""


def render_keys(width: int = 100) -> str:
    """The key listing: each section's title, then ``key: type = default`` and its doc, indented."""
    lines = [INTRO]
    wrap = textwrap.TextWrapper(width=width, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False,
                                break_long_words=False)
    keys = config_keys()
    # Keys of the top level first, then each section: a key always sits under its own title.
    top = [k for k in keys if "." not in k.key and k.type != "section"]
    for k in [KeyDoc("", "section", "", "the device and compilation"), *top, *(k for k in keys if k not in top)]:
        if k.type == "section":
            lines += ["", f"{k.key or '(top level)'}: {k.doc}"]
            continue
        lines.append(f"  {k.key}: {k.type} = {k.default}")
        lines += wrap.wrap(k.doc)
    return "\n".join(lines) + "\n"
