"""``ConfigError`` and the one way the config modules raise it: ``<field>=<value> <problem>; <fix>``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    """Raise ``ConfigError("<field_name>=<value!r> <problem>; <fix>")``."""
    raise ConfigError(f"{field_name}={value!r} {problem}; {fix}")


def check_finite(prefix: str, section: Any) -> None:
    """Every float of dataclass ``section`` (a field, or an entry of a list field) must be finite.

    NaN compares false with everything, so a NaN would pass every later ``<``/``>`` bound (and inf
    most of them); run this first in a section's ``validate()``. ``prefix`` names the section
    (``"train"`` gives ``train.lr=nan ...``).
    """
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            default = f" (the default is {f.default!r})" if f.default not in (dataclasses.MISSING, None) else ""
            fail(f"{prefix}.{f.name}", value, "is not a finite number", f"give a finite value{default}")
