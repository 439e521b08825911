"""Activation names: megacore's (``model.activation``, ``vision.activation``, ...) <-> the names
transformers' ``ACT2FN`` knows, for one ``config.json`` key of one family.

transformers has several names for one function (``gelu_pytorch_tanh``, ``gelu_new`` and
``gelu_python_tanh`` are all GELU with the tanh approximation; ``silu`` and ``swish`` are the same
function), and each family writes its own. A table lists, per megacore name, the transformers
names of the same function: the first is written on export, every one is accepted on import.
"""

from __future__ import annotations

from typing import Optional

from megacore.config import ConfigError

# transformers' names of GELU with the tanh approximation (megacore ``gelu_tanh``).
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh")
SILU = ("silu", "swish")


class ActivationNames:
    """megacore activation name <-> transformers ``ACT2FN`` names under config.json ``key``.

    ``table``: megacore name -> the transformers names of the same function (first: written).
    ``default``: the transformers default when config.json omits ``key``.
    """

    def __init__(self, key: str, table: dict[str, tuple[str, ...]], default: str):
        self.key, self.table, self.default = key, dict(table), default
        self.reads = {hf: ours for ours, names in self.table.items() for hf in names}
        if default not in self.reads:
            raise ValueError(f"default {default!r} of {key} is not one of the names {sorted(self.reads)}")

    def to_ours(self, hf_config: dict, family: str) -> str:
        """The megacore name of ``hf_config[key]`` (default if absent); ConfigError if it has none."""
        name = hf_config.get(self.key)
        name = self.default if name is None else name
        if name not in self.reads:
            raise ConfigError(f"{self.key}={name!r} is not supported for {family}; use one of {sorted(self.reads)}")
        return self.reads[name]

    def to_hf(self, ours: str) -> Optional[str]:
        """The name written for megacore's ``ours``; None when this key cannot express it."""
        names = self.table.get(ours)
        return names[0] if names else None

    def __repr__(self) -> str:
        return f"ActivationNames({self.key!r}, {self.table!r})"
