"""Name -> class registries for task families, learners and studies.

The registries import nothing of metalens but its errors: the built-in families,
learners and studies register themselves with the ``register`` decorator when their
modules are imported, which ``metalens/__init__.py`` does (so ``import metalens`` or any
``from metalens... import`` fills them). A user's own class registers the same way.

>>> import metalens
>>> from metalens.registry import TASKS
>>> "sinusoid" in TASKS
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from metalens.errors import ConfigError

__all__ = ["Entry", "Registry", "TASKS", "LEARNERS", "STUDIES", "UnknownName"]

T = TypeVar("T")


class UnknownName(ConfigError, KeyError):
    """A name that no registry entry has; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a sentence
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]  # the class; ``cls.Config`` is its options dataclass
    summary: str  # one line for ``metalens list``


class Registry(Generic[T]):
    """An ordered map from names to classes, filled by the ``register`` decorator."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, summary: str | None = None) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            if not hasattr(cls, "Config"):
                raise TypeError(f"{cls.__name__} must define a nested Config dataclass")
            line = summary or (cls.__doc__ or "").strip().splitlines()[0]
            self._entries[name] = Entry(name, cls, line)
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def __getitem__(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "(none)"
            raise UnknownName(f"unknown {self.what} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        return list(self._entries)


TASKS: Registry[Any] = Registry("task family")
LEARNERS: Registry[Any] = Registry("learner")
STUDIES: Registry[Any] = Registry("study")
