"""Typed configuration: dataclasses built from plain dicts (TOML, JSON, ``--set``).

Every configurable object in metalens (task families, learners, the trainer)
declares a frozen dataclass with one documented field per option. This module turns
untrusted dicts into those dataclasses with errors that name the key, the expected
type and the accepted keys, and parses ``--set key=value`` overrides.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class C:
...     shots: int = 5
...     noise_std: float = 0.0
>>> from_dict(C, {"shots": 10})
C(shots=10, noise_std=0.0)
>>> from_dict(C, {"shot": 10})
Traceback (most recent call last):
...
metalens.config.ConfigError: unknown option 'shot' for C; valid options: noise_std, shots
>>> parse_set("task.shots=5")
('task', 'shots', 5)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "from_dict", "to_dict", "parse_set", "load_file", "field_docs", "opt", "check_min",
           "check_positive", "check_step_counts", "SECTIONS"]

T = TypeVar("T")

SECTIONS = ("task", "learner", "train", "study")


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message says how to fix it."""


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"option {name!r} has an invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"option {name!r} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name!r} expects a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, args[0], v) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"option {name!r} expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(name, a, v) for a, v in zip(args, value))
        return origin(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"option {name!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"option {name!r} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {name!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"option {name!r} expects a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types.

    The dataclass's own ``__post_init__`` then checks ranges; a ``ValueError`` it
    raises is re-raised as :class:`ConfigError`.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} for {cls.__name__}; valid options: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line ``help`` shown by the CLI.

    Mutable defaults (lists, tuples of lists) are copied per instance.
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check_min(obj: Any, minimum: int, *names: str, why: str = "") -> None:
    """For ``__post_init__``: raise ``ValueError`` at the first field ``names`` of ``obj`` below ``minimum``.

    >>> from types import SimpleNamespace
    >>> check_min(SimpleNamespace(steps=0), 1, "steps")
    Traceback (most recent call last):
    ValueError: steps must be >= 1, got 0
    """
    for name in names:
        value = getattr(obj, name)
        if not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}{' ' + why if why else ''}, got {value}")


def check_positive(obj: Any, *names: str) -> None:
    """For ``__post_init__``: raise ``ValueError`` at the first field ``names`` of ``obj`` that is not > 0."""
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_step_counts(steps: int | dict[str, int]) -> None:
    """For study configs: ``steps`` is one count or a table ``{name: count}``, every count an integer >= 1."""
    counts = steps.values() if isinstance(steps, dict) else [steps]
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
        raise ValueError(f"steps must be integers >= 1, got {steps}")


def field_docs(cls: type) -> dict[str, tuple[Any, str]]:
    """``{name: (default, help)}`` for each field of config dataclass ``cls``."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = (default, f.metadata.get("help", ""))
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def parse_set(item: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise ConfigError(f"--set key must be section.key with section one of {', '.join(SECTIONS)}; got {key!r}")
    if section not in SECTIONS:
        raise ConfigError(f"--set section must be one of {', '.join(SECTIONS)}; got {section!r} in {item!r}")
    return section, name, _parse_value(text.strip())


def load_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config with optional ``[task]``, ``[learner]`` and ``[train]`` tables.

    Top-level ``task = "name"`` / ``learner = "name"`` strings are accepted as the
    names (also as ``name = ...`` inside the tables).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            out[key].update(value)
        elif key in ("task", "learner") and isinstance(value, str):
            out[key]["name"] = value
        else:
            raise ConfigError(
                f"config file {str(p)!r}: unexpected top-level key {key!r}; "
                f"use tables [{'], ['.join(SECTIONS)}]"
            )
    return out
