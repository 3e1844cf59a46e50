"""Experiment tracking: every training step, stage record and final metric, to TensorBoard.

Off by default. ``compress(..., track="tensorboard")`` (``slimkit compress --track
tensorboard``) writes event files to ``OUT/tensorboard`` while the run goes, so
``tensorboard --logdir OUT`` follows it live and compares runs. Code anywhere below the
runner logs through :func:`log_scalars` / :func:`log_text`, which do nothing when no tracker
is active, so techniques never depend on a tracker.

Example:
    >>> with tracking("tensorboard", Path("out")):  # doctest: +SKIP
    ...     log_scalars("train/distill", {"loss": 0.31, "lr": 1e-3}, step=120)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from slimkit.core.errors import ConfigError

#: The trackers ``track=`` accepts.
KINDS = ("tensorboard",)
#: The folder under the output directory that holds the event files.
FOLDER = "tensorboard"

_current: ContextVar[Any] = ContextVar("slimkit_tracker", default=None)
_scope: ContextVar[str] = ContextVar("slimkit_tracker_scope", default="")


def _writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("track='tensorboard' needs the tensorboard package: "
                          "pip install 'slimkit[track]' (or pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(folder))


def flat_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, keyed by their path (``accuracy/top1``);
    booleans, strings, lists and non-finite values are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[name] = float(value)
    return out


def check_kind(kind: str | None) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before any work.

    Raises:
        ConfigError: naming the kind and what to do.
    """
    if kind is None:
        return
    if kind not in KINDS:
        raise ConfigError(f"track='{kind}': slimkit tracks to {', '.join(KINDS)}")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("track='tensorboard' needs the tensorboard package: "
                          "pip install 'slimkit[track]' (or pip install tensorboard)")


@contextlib.contextmanager
def tracking(kind: str | None, out: Path) -> Iterator[Any]:
    """Make a tracker of ``kind`` (None: none) the active one inside the block, writing
    under ``out / FOLDER``.

    Raises:
        ConfigError: see :func:`check_kind`.
    """
    check_kind(kind)
    if kind is None:
        yield None
        return
    writer = _writer(out / FOLDER)
    token = _current.set(writer)
    try:
        yield writer
    finally:
        _current.reset(token)
        writer.close()


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix every tag logged inside the block with ``name`` (a recipe's stage, so two
    stages that both fine-tune keep their curves apart)."""
    token = _scope.set(f"{_scope.get()}/{name}" if _scope.get() else name)
    try:
        yield
    finally:
        _scope.reset(token)


def _tag(name: str) -> str:
    return f"{_scope.get()}/{name}" if _scope.get() else name


def active() -> bool:
    """Whether a tracker takes what is logged (callers may skip building costly values)."""
    return _current.get() is not None


def log_scalars(prefix: str, values: Mapping[str, Any], step: int = 0) -> None:
    """Log every finite number of ``values`` (nested: paths) under ``prefix`` at ``step``."""
    writer = _current.get()
    if writer is None:
        return
    for name, value in flat_numbers(values, _tag(prefix)).items():
        writer.add_scalar(name, value, step)


def log_text(tag: str, value: Any, step: int = 0) -> None:
    """Log ``value`` (text, or JSON for anything else) under ``tag`` at ``step``."""
    writer = _current.get()
    if writer is None:
        return
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
    writer.add_text(_tag(tag), f"```\n{text}\n```", step)
