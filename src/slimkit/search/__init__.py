"""Automated compression search: find the recipe that meets a target with the best objective.

The recipe's ``search:`` block (:mod:`slimkit.search.config`) declares what may change; an
Optuna study (seeded, stored in SQLite or PostgreSQL, resumable, shared by workers) proposes
candidates, measured cheap first: each searched setting's sensitivity alone, once before any
trial (:mod:`slimkit.search.sensitivity`: it caps the space under the target's metric drop
and seeds the first trials); then every candidate's FLOPs, size, BatchNorm re-estimated proxy
metric on the validation split and interleaved latency; the best feasible ones are then
measured for real and the chosen recipe is written as YAML that ``compress`` replays.

Optuna is imported lazily, when a search runs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {"search": "slimkit.search.run", "SearchResult": "slimkit.search.run",
            "SearchConfig": "slimkit.search.config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimkit.search' has no attribute '{name}'")


class _CallableModule(types.ModuleType):
    """``slimkit.search(...)`` calls :func:`slimkit.api.search`, though ``slimkit.search`` is
    also this package (an imported subpackage shadows a same-named function)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from slimkit.api import search as _search

        return _search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
