"""Name -> constructor registries for task families and learners.

>>> from metalens.registry import TASKS
>>> "sinusoid" in TASKS
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry", "TASKS", "LEARNERS", "STUDIES", "UnknownName"]

T = TypeVar("T")


class UnknownName(KeyError):
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
        _ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "(none)"
            raise UnknownName(f"unknown {self.what} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        _ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        _ensure_loaded()
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        _ensure_loaded()
        return list(self._entries)


TASKS: Registry[Any] = Registry("task family")
LEARNERS: Registry[Any] = Registry("learner")
STUDIES: Registry[Any] = Registry("study")  # filled by metalens.studies

_loaded = False


def _ensure_loaded() -> None:
    """Import the modules that register the built-in families and learners."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import metalens.learners  # noqa: F401
    import metalens.studies
    import metalens.tasks  # noqa: F401

    metalens.studies._load()
