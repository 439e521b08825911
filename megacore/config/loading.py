"""Building a ``RunConfig`` from YAML and ``dotted.key=value`` overrides.

Values are coerced to each field's annotated type (with an error that names the key and shows a
valid example); unknown keys are errors that list the nearest valid names, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Optional

from megacore.config.errors import ConfigError
from megacore.config.fields import walk_fields
from megacore.config.run import RunConfig


# Keys that once existed: a config that still sets one learns where the setting went (or that it is gone).
RETIRED_KEYS = {
    "train.log_interval": "use log.interval (how often the progress line prints; metrics.jsonl records every step)",
    "data.num_workers": "remove it: nothing read it (the data is read in the training process, without loader "
                        "workers)",
}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _unknown_key(full: str, name: str, valid: list[str], where: str = "") -> ConfigError:
    """The error for an unknown key ``full`` (its last part ``name``; ``valid``: the keys of its section)."""
    if full in RETIRED_KEYS:
        return ConfigError(f"unknown config key {full!r}; {RETIRED_KEYS[full]}")
    hint = _suggest(name, valid)
    elsewhere = [k for k, _, _ in walk_fields(RunConfig) if k.rsplit(".", 1)[-1] == name and k != full]
    if elsewhere:  # the right key in the wrong section, e.g. train.dtype for precision.dtype
        hint = f"{name} is a key of another section: did you mean {', '.join(elsewhere)}?"
    return ConfigError(f"unknown config key {full!r}{where}; {hint} (`megacore train --help` lists every key)")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer; give a whole number")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not an integer; give a whole number") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}={value!r} is not an integer; give a whole number")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number; give e.g. 0.1 or 1e-4") from None
    if tp is str:
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            import yaml

            parsed = yaml.safe_load(value)
            value = parsed if isinstance(parsed, list) else [yaml.safe_load(p) for p in value.split(",") if p.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list; give e.g. [a, b] or a,b")
        return list(value)
    return value


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: Optional[dict], prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with suggestions."""
    data = dict(data or {})
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, key, names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping of keys, got {value!r}")
            kwargs[key] = from_dict(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def apply_override(cfg: Any, dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` on a nested dataclass, with type coercion and a clear unknown-key error."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise _unknown_key(dotted, part, names, f" ({part!r} is not a key of {where})")
        if i == len(parts) - 1:
            tp = _type_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted} is a section, not a value; set one of its keys, e.g. {dotted}.<key>=...")
            setattr(obj, part, _coerce(value, tp, dotted))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section")


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides (not yet validated)."""
    import yaml

    data = {}
    if path is not None:
        example = "pass the path to a YAML file such as configs/tiny_cpu.yaml"
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; {example}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path!r} is a directory; {example}") from None
        except PermissionError:
            raise ConfigError(f"config file {path!r} cannot be read (permission denied); make it readable") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                              "UTF-8 YAML") from None
        except OSError as e:
            raise ConfigError(f"config file {path!r} cannot be read ({e.strerror or e}); {example}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, train:, ...)")
    cfg = from_dict(RunConfig, data)
    # The dotted keys the user set (YAML or override), whatever their value: a key set to exactly its
    # default is still a choice (model.from_hf keeps such model.* keys; megacore.interop.hf_finetune).
    cfg.explicit_keys = set(_dotted_keys(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.iters=100)")
        key, value = item.split("=", 1)
        apply_override(cfg, key.strip(), value)
        cfg.explicit_keys.add(key.strip())
    return cfg


def _dotted_keys(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def dump_run_config(cfg: RunConfig, header: str = "") -> str:
    """``cfg`` as the YAML that :func:`load_run_config` reads back to an equal ``RunConfig`` (every key,
    in declaration order), after ``header`` (lines written as YAML comments)."""
    import yaml

    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=1000)
