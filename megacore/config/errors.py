"""``ConfigError`` and the one way the config modules raise it: ``<field>=<value> <problem>; <fix>``."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    """Raise ``ConfigError("<field_name>=<value!r> <problem>; <fix>")``."""
    raise ConfigError(f"{field_name}={value!r} {problem}; {fix}")
