"""Strict mapping of plain dicts (YAML) onto frozen config dataclasses.

Every config class is a frozen dataclass whose fields carry a comment; each class validates its own fields
in ``__post_init__`` through :func:`check` (one place per class), and ``RunConfig`` holds the cross-section checks.
Unknown keys are errors naming the key and the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the offending key."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def suggest(name: str, valid) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or ''."""
    near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else ""


def check_choice(value, key: str, choices) -> None:
    """Raise ConfigError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {sorted(choices)}{suggest(str(value), choices)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown key '{full}'{suggest(str(k), names)}; valid keys: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}.{e}") from None
        raise


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (tuples become lists), suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def replace(cfg, **changes):
    """dataclasses.replace that re-runs validation."""
    return dataclasses.replace(cfg, **changes)
