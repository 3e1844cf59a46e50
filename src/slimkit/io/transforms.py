"""Structural transforms: how an artifact rebuilds a changed architecture without pickles.

A technique that changes a model's structure (removing channels, factorizing layers, swapping
in quantized modules) records a *transform*: its kind, the module that knows how to replay it,
and its JSON plan. An artifact stores ``architecture = zoo spec + transforms``; loading builds
the zoo model, replays each transform in order to get the same structure, then loads the
weights. Architecture + plan + safetensors, never a pickled module.

Techniques register a rebuilder at import time::

    @register_rebuilder("structured_prune")
    def rebuild(module: nn.Module, plan: dict) -> nn.Module: ...

Loading imports the recorded module (only modules inside the ``slimkit`` package) so its
rebuilder is registered, then calls it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from slimkit.core.errors import ConfigError, ModelLoadError
from slimkit.core.registry import Registry
from slimkit.io.model import SlimModel

Rebuilder = Callable[[nn.Module, dict], nn.Module]
REBUILDERS: Registry[Rebuilder] = Registry("structural transform")


def register_rebuilder(kind: str) -> Callable[[Rebuilder], Rebuilder]:
    """Register ``fn(module, plan) -> module`` that replays a transform's structure."""

    def add(fn: Rebuilder) -> Rebuilder:
        REBUILDERS.register(kind, fn)
        return fn

    return add


def record_transform(model: SlimModel, kind: str, owner: str, plan: dict[str, Any]) -> None:
    """Append a transform to ``model.arch`` so the artifact can rebuild the new structure.

    Args:
        model: the model after the transform (its ``arch`` is updated in place; a model
            without a rebuildable spec is left alone, its artifact stores a graph instead).
        kind: the rebuilder's registered name.
        owner: the module registering that rebuilder (``slimkit.prune.structured``).
        plan: the JSON-serializable plan the rebuilder replays.
    """
    if model.arch is None:
        return
    if not owner.startswith("slimkit."):
        raise ConfigError(f"transform owner '{owner}' must be a module inside slimkit")
    model.arch.setdefault("transforms", []).append({"kind": kind, "owner": owner, "plan": plan})


def replay_transforms(module: nn.Module, transforms: list[dict]) -> nn.Module:
    """Replay recorded transforms on a freshly built module (its weights are overwritten later).

    Raises:
        ModelLoadError: a transform names a module outside slimkit or an unknown kind.
    """
    for t in transforms:
        owner = str(t.get("owner", ""))
        if not owner.startswith("slimkit."):
            raise ModelLoadError(f"artifact transform '{t.get('kind')}' names module '{owner}' "
                                 "outside slimkit; refusing to import it")
        try:
            importlib.import_module(owner)
            fn = REBUILDERS.get(str(t.get("kind")))
        except (ImportError, ConfigError) as exc:
            raise ModelLoadError(f"cannot replay artifact transform '{t.get('kind')}': {exc}; "
                                 "was it written by a newer slimkit?") from None
        try:
            module = fn(module, t["plan"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ModelLoadError(f"artifact transform '{t.get('kind')}' does not fit the "
                                 f"architecture: {exc}; re-create the artifact") from None
    return module
