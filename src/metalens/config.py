"""Typed options: frozen dataclasses whose fields declare their meaning and their constraints.

Every configurable object in metalens (task families, learners, the trainer, studies)
declares a frozen dataclass deriving from :class:`Options`, one field per option made
with :func:`opt`: the default, a one-line help, and what values are allowed (bounds,
finiteness, lengths, an increasing pair; choices are ``Literal`` types). Constraints are
enforced in one place, :meth:`Options.__post_init__`, whether the dataclass is built in
Python or from an untrusted dict (TOML, JSON, ``--set``) by :func:`from_dict`; the rules
that tie several options together go in the class's :meth:`Options.check`. The command
line shows each option's constraint (``metalens list NAME``), and every error names the
option, the value and what is allowed.

Why not pydantic: its lax mode turns ``true`` into ``1`` and ``"5"`` into ``5`` (inputs this
project refuses), its strict mode refuses TOML's lists for tuples and tables for nested
options, and its messages would need rewriting to name the ``--set`` key; the rules here
are the hundred lines below.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class C(Options):
...     shots: int = opt(5, "support points per task", ge=1)
...     noise_std: float = opt(0.0, "noise on y", ge=0)
>>> from_dict(C, {"shots": 10})
C(shots=10, noise_std=0.0)
>>> from_dict(C, {"shots": 0}, prefix="task.")
Traceback (most recent call last):
...
metalens.errors.ConfigError: task.shots must be >= 1, got 0
>>> from_dict(C, {"shot": 10})
Traceback (most recent call last):
...
metalens.errors.ConfigError: unknown option 'shot' for C; valid options: noise_std, shots
>>> requirement(C, "noise_std")
'a number >= 0'
>>> parse_set("task.shots=5")
('task', 'shots', 5)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from metalens.errors import ConfigError, excerpt
from metalens.files import NotRegular, read_regular

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "Options", "Rule", "opt", "from_dict", "to_dict", "field_docs", "requirement",
           "parse_set", "load_file", "SECTIONS"]

T = TypeVar("T")

SECTIONS = ("task", "learner", "train", "study")
_MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is not a config file
_INT_LIMIT = 1 << 62  # integer options are sizes and counts: a 64-bit machine cannot hold more


@dataclass(frozen=True)
class Rule:
    """What values an option allows beyond its type (see :func:`opt`). Bounds apply to a number,
    to every element of a list, or to every value of a table."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    increasing: bool = False  # a list (low, high, ...) strictly increasing
    nondecreasing: bool = False  # a list (low, high, ...) with low <= high (a single value allowed)
    finite: bool = True  # numbers must be finite (no inf, no nan)
    check: Callable[[Any], None] | None = None  # raises ValueError("must be ...") for other rules

    def bounds(self) -> str:
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, min_len: int | None = None, max_len: int | None = None, increasing: bool = False,
        nondecreasing: bool = False, finite: bool = True, check: Callable[[Any], None] | None = None) -> Any:
    """A dataclass field: its default, a one-line ``help`` and the values it allows (a :class:`Rule`).

    Mutable defaults (lists, dicts) are copied per instance.
    """
    rule = Rule(ge, gt, le, lt, min_len, max_len, increasing, nondecreasing, finite, check)
    meta = {"help": help, "rule": rule}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _TooLarge(ValueError):
    """An integer option beyond ``2**62``."""


class _Invalid(Exception):
    """One option's value is not allowed: ``name`` and what is wrong, without the section prefix."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name, self.message = name, message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _phrase(tp: Any) -> str:
    """How a type reads in an error message: 'an integer', 'a list of 2 numbers', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_phrase(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (or null)" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a table {{name = {_phrase(args[1]).removeprefix('an ').removeprefix('a ')}, ...}}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(
        tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, _phrase(tp))


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (lists become tuples, integers floats); raises ``ValueError`` if it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (value == "null" and str not in args)):
            return None  # TOML has no null: --set accepts the bare word null
        too_large = False
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except _TooLarge:
                too_large = True
            except ValueError:
                pass
        raise _TooLarge if too_large else ValueError
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ValueError
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return origin(_coerce(args[0], v) for v in value) if args else origin(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError
        return {k: _coerce(args[1], v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise _TooLarge  # sizes and counts beyond what 64-bit tensors can hold are no option values
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value)
        raise ValueError
    return value


def _numbers(value: Any) -> list[Any]:
    """The numbers a rule's bounds apply to: the value, or the elements of a list or table."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    return [value]


def _enforce(name: str, rule: Rule, value: Any) -> None:
    if value is None:
        return
    nums = [v for v in _numbers(value) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for v in nums:
        if isinstance(v, float) and rule.finite and not math.isfinite(v):
            raise _Invalid(name, f"must be finite, got {_show(value)}")
        for op, bound, ok in ((">=", rule.ge, lambda a, b: a >= b), (">", rule.gt, lambda a, b: a > b),
                              ("<=", rule.le, lambda a, b: a <= b), ("<", rule.lt, lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                what = "values must be" if value is not v else "must be"
                raise _Invalid(name, f"{what} {rule.bounds()}, got {_show(value)}")
    if isinstance(value, (list, tuple)):
        if rule.min_len is not None and len(value) < rule.min_len:
            raise _Invalid(name, f"must hold at least {rule.min_len} value(s), got {_show(value)}")
        if rule.max_len is not None and len(value) > rule.max_len:
            raise _Invalid(name, f"must hold at most {rule.max_len} value(s), got {_show(value)}")
        if rule.increasing and any(not a < b for a, b in zip(value, value[1:])):
            raise _Invalid(name, f"must be increasing (low < high), got {_show(value)}")
        if rule.nondecreasing and any(not a <= b for a, b in zip(value, value[1:])):
            raise _Invalid(name, f"must be (low, high) with low <= high, got {_show(value)}")
    if rule.check is not None:
        try:
            rule.check(value)
        except ValueError as e:
            raise _Invalid(name, f"{e}, got {_show(value)}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Options:
    """Base of every options dataclass (``@dataclass(frozen=True) class Config(Options)``).

    After the generated ``__init__``, each field is brought to its declared type (lists
    become tuples, integers floats) and checked against its :class:`Rule`; then
    :meth:`check` tests the rules that tie several fields together. Errors are
    :class:`~metalens.errors.ConfigError` naming the option.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                coerced = _coerce(hints[f.name], value)
            except _TooLarge:
                raise ConfigError(f"{f.name} must hold integers below 2^62, got {_show(value)}") from None
            except ValueError:
                raise ConfigError(f"{f.name} must be {_phrase(hints[f.name])}, got {_show(value)}") from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            rule = f.metadata.get("rule")
            if rule is not None:
                try:
                    _enforce(f.name, rule, coerced)
                except _Invalid as e:
                    raise ConfigError(str(e)) from e
        try:
            self.check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check(self) -> None:
        """Rules between fields (each field's own rule is already enforced); raise ``ValueError`` with
        a message that names the options."""


def from_dict(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "", where: str = "") -> T:
    """Build options class ``cls`` from a dict of untrusted values.

    Unknown keys, values of the wrong type and values outside an option's rule raise
    :class:`~metalens.errors.ConfigError`. ``prefix`` (e.g. ``"task."``) is put before the
    option's name in messages, ``where`` (e.g. ``"task 'sinusoid'"``) before messages of the
    rules between options.
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: options must be a table of name = value, got {_show(data)}")
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ConfigError(f"unknown option '{prefix}{unknown[0]}' for {where or cls.__name__}; valid options: "
                          f"{', '.join(sorted(names)) or '(none)'}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as e:
        if not isinstance(e, ConfigError):
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
        cause = e.__cause__
        if isinstance(cause, _Invalid):
            raise ConfigError(f"{prefix}{cause}") from None
        text = str(e)
        first = text.split(" ", 1)[0]
        if first in names:  # a type error: "<name> must be ..."
            raise ConfigError(f"{prefix}{text}") from None
        raise ConfigError(f"{where}: {text}" if where else text) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of an options dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def requirement(cls: type, name: str) -> str:
    """What option ``name`` of ``cls`` allows, in words (shown by ``metalens list``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    text = _phrase(_hints(cls)[name])
    rule: Rule | None = f.metadata.get("rule")
    if rule is not None:
        each = text.startswith("a list") or text.startswith("a table")
        if rule.bounds():
            text += (", each " if each else " ") + rule.bounds()
        for flag, words in ((rule.increasing, "increasing"), (rule.nondecreasing, "low <= high")):
            if flag:
                text += f", {words}"
        if rule.min_len is not None:
            text += f", at least {rule.min_len} long"
        if rule.max_len is not None:
            text += f", at most {rule.max_len} long"
        if rule.check is not None and rule.check.__doc__:
            text += f"; {rule.check.__doc__.strip().splitlines()[0].rstrip('.')}"
    return text


def field_docs(cls: type) -> dict[str, tuple[Any, str, str]]:
    """``{name: (default, help, requirement)}`` for each field of options class ``cls``."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = (default, f.metadata.get("help", ""), requirement(cls, f.name))
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
    """Read a TOML config with optional ``[task]``, ``[learner]``, ``[train]`` and ``[study]`` tables.

    Top-level ``task = "name"`` / ``learner = "name"`` strings are accepted as the
    names (also as ``name = ...`` inside the tables). A UTF-8 byte-order mark is allowed.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder; give a TOML file")
    try:
        raw = read_regular(p, limit=_MAX_CONFIG_BYTES, follow=True)
    except NotRegular as e:
        raise ConfigError(f"config file {str(p)!r} {e}; give a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (it starts {excerpt(raw, 20)})") from None
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
