"""A small name -> object registry; every extension point (model families, tasks, quant methods) uses one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lowbit.errors import unknown_choice

T = TypeVar("T")


def qualname(cls: type) -> str:
    """"module.QualName" of a class: how registries keyed by class name (never by substrings) spell it."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry(Generic[T]):
    """Maps names to objects. ``kind`` appears in error messages ("unknown task 'x'; choose one of ...").

    Example:
        >>> tasks: Registry[int] = Registry("task")
        >>> tasks.register("a")(1)
        1
        >>> tasks.get("a")
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_choice(self.kind, name, list(self._items))
        return self._items[name]

    def for_class(self, cls: type) -> T | None:
        """The entry registered under the qualified name of ``cls`` or its nearest base (MRO order), else None."""
        for c in cls.__mro__:
            name = qualname(c)
            if name in self._items:
                return self._items[name]
        return None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
