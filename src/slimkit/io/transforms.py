"""Structural transforms: how an artifact rebuilds a changed architecture without pickles.

A technique that changes a model's structure (removing channels, factorizing layers, swapping
in quantized modules) returns a transform in its Record: a rebuilder kind and a JSON plan. The
stage contract stores it in the architecture as ``{"kind", "version", "plan"}``; an artifact
stores ``architecture = zoo spec + transforms``, and loading builds the zoo model, replays each
transform in order to get the same structure, then loads the weights. Architecture + plan +
safetensors, never a pickled module, and never a Python module path.
"""

from __future__ import annotations

from torch import nn

from slimkit.core.errors import ConfigError, ModelLoadError
from slimkit.core.stages import LEGACY_OWNERS, REBUILDERS


def _version(t: dict) -> int:
    """The entry's version; entries written with an ``owner`` module path are version 1."""
    if "version" in t:
        return int(t["version"])
    owner = str(t.get("owner", ""))
    if str(t.get("kind")) not in LEGACY_OWNERS.get(owner, ()):
        raise ModelLoadError(f"artifact transform '{t.get('kind')}' names module '{owner}' "
                             "outside slimkit's known rebuilders; refusing to import it")
    return 1


def replay_transforms(module: nn.Module, transforms: list[dict]) -> nn.Module:
    """Replay recorded transforms on a freshly built module (its weights are overwritten later).

    Raises:
        ModelLoadError: an unknown kind, a version newer than this slimkit reads, a legacy
            entry naming a module outside slimkit, or a plan that does not fit.
    """
    for t in transforms:
        kind = str(t.get("kind"))
        version = _version(t)
        try:
            rebuilder = REBUILDERS.get(kind)
        except ConfigError as exc:
            raise ModelLoadError(f"cannot replay artifact transform '{kind}': {exc}; "
                                 "was it written by a newer slimkit?") from None
        if version > rebuilder.version:
            raise ModelLoadError(f"artifact transform '{kind}' is version {version}; this "
                                 f"slimkit reads up to {rebuilder.version}: upgrade slimkit")
        try:
            module = rebuilder.fn(module, t["plan"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ModelLoadError(f"artifact transform '{kind}' does not fit the "
                                 f"architecture: {exc}; re-create the artifact") from None
    return module
