"""SlimModel: a module together with what it takes as input and where it came from."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def set_mode(module: nn.Module, train: bool) -> nn.Module:
    """``module.train(train)``, tolerating exported graphs (whose mode is fixed at export)."""
    with contextlib.suppress(NotImplementedError):
        module.train(train)
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model``; returns the (possibly new) root.

    ``name == ""`` replaces the root itself: the caller must use the returned module.
    """
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


@contextlib.contextmanager
def modes_kept(module: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's own train/eval flag on exit (a frozen BN stays frozen)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class SlimModel:
    """A PyTorch module plus its per-sample input spec and provenance.

    Attributes:
        module: the model; slimkit never mutates a user's module in place (it works on copies).
        input_shape: shape of one sample (no batch dimension).
        input_dtype: ``float32`` for images/signals, ``int64`` for tokens.
        name: where it came from (``zoo:lenet5``, a path, ``python``).
        arch: a rebuildable spec (``{"zoo": ..., "kwargs": ...}``) when one exists, else None
            (then the artifact stores a ``torch.export`` archive).
        history: stage records of every compression applied so far.
        num_classes: output classes, when known.
        recipe: the recipe that produced it, when it came out of ``compress``.
        source: the path it was loaded from (outputs must never overwrite it).
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    name: str = "python"
    arch: dict | None = None
    history: list[dict] = field(default_factory=list)
    num_classes: int | None = None
    recipe: dict | None = None
    source: str | None = None  # the file or directory it was loaded from, if any

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor]:
        """Deterministic random inputs of the right shape and dtype."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, *self.input_shape)
        if self.input_dtype.startswith("int"):
            high = int((self.arch or {}).get("kwargs", {}).get("vocab_size", 2))
            return (torch.randint(0, high, shape, generator=gen),)
        return (torch.randn(shape, generator=gen),)

    def copy(self, module: nn.Module | None = None) -> SlimModel:
        """A deep copy (or this spec around another ``module``)."""
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module) if module is None else module
        new.history = copy.deepcopy(self.history)
        new.arch = copy.deepcopy(self.arch)
        return new

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "input_dtype": self.input_dtype, "num_classes": self.num_classes,
                "arch": self.arch}
