"""One generic registry used for every pluggable thing (stage kinds, criteria, models, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from slimkit.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table that rejects duplicates and explains unknown names.

    Args:
        what: what the names are, for error messages ("stage kind").
        plugins: modules whose import registers entries (imported on the first lookup, so the
            registry's own module imports none of them: a low layer stays low).

    Example:
        >>> CRITERIA = Registry("importance criterion")
        >>> @CRITERIA.register("l1")
        ... def l1(w): return w.abs().sum()
        >>> CRITERIA.get("l1") is l1
        True
    """

    def __init__(self, what: str, plugins: Sequence[str] = ()) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._plugins = tuple(plugins)
        self._loaded = not self._plugins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: a plugin may look the registry up while importing
            for name in self._plugins:
                importlib.import_module(name)

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        """Return the item called ``name``.

        Raises:
            ConfigError: naming the known names and the closest one.
        """
        self._load()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(
                f"unknown {self.what} '{name}'.{did_you_mean(name, self._items)} Known: {known}."
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)
