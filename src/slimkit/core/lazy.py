"""Packages whose public names are imported on first use.

Importing a package of slimkit loads none of its modules: ``from slimkit.prune import
MagnitudePruneConfig`` imports only the module defining it. This is what lets the CLI check its
arguments, paths and recipe before it loads torch or any model (torch alone takes seconds to
import on a cold machine).

Example:
    >>> # in slimkit/prune/__init__.py
    >>> __getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ...     "slimkit.prune.config": ("MagnitudePruneConfig",),
    ...     "slimkit.prune.magnitude": ("magnitude_prune",),
    ... })
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class _KeepsExports(types.ModuleType):
    """A package one of whose exports is named like one of its submodules (``slimkit.data``
    exports the function ``split`` of ``slimkit.data.split``): importing the submodule must not
    replace the export in the package, as an eagerly importing package would rebind it."""

    _shadowed: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._shadowed and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules[f"{package}.{name}"]
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]],
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a package exporting names lazily.

    Args:
        package: the package's ``__name__``.
        exports: ``{module: names}``, the public names and the modules defining them.

    Returns:
        ``(__getattr__, __dir__, __all__)``. ``__getattr__`` imports a public name's module on
        first access (the value is then cached in the package) and, as an eagerly importing
        package would, a submodule accessed as an attribute (``slimkit.io.hf``).

    Raises:
        ValueError: a name is exported twice.
    """
    where: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in where:
                raise ValueError(f"{package} exports '{name}' from both {where[name]} and "
                                 f"{module}")
            where[name] = module
    public = sorted(where)
    module = sys.modules[package]
    shadowed = frozenset(where) & {m.name for m in pkgutil.iter_modules(module.__path__)}
    if shadowed:
        module.__class__ = _KeepsExports
        module._shadowed = shadowed

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> list[str]:
        return sorted({*public, *vars(sys.modules[package])})

    return __getattr__, __dir__, public
