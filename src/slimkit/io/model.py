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


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor: its forward argument name, per-sample shape and dtype.

    Attributes:
        name: the forward argument (``input_ids``) or ``input`` / ``input_1`` for positional ones.
        shape: one sample's shape (no batch axis), at the example's sizes.
        dtype: ``float32``, ``int64``, ...
        dynamic: axes of the full tensor (the batch is 0) that vary, by name
            (``{1: "sequence"}``); the batch axis is always dynamic.
        high: integer inputs' exclusive upper bound for example values (the vocabulary size);
            attention masks are examples of all ones.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: dict[int, str] = field(default_factory=dict)
    high: int | None = None

    def example(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        shape = (batch, *self.shape)
        if not self.dtype.startswith("int") and self.dtype != "bool":
            return torch.randn(shape, generator=gen).to(getattr(torch, self.dtype))
        if "mask" in self.name:
            return torch.ones(shape, dtype=getattr(torch, self.dtype))
        return torch.randint(0, max(1, self.high or 2), shape, generator=gen,
                             dtype=getattr(torch, self.dtype))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "dynamic": {str(k): v for k, v in self.dynamic.items()}, "high": self.high}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(raw["name"], tuple(raw["shape"]), raw["dtype"],
                   {int(k): v for k, v in raw.get("dynamic", {}).items()}, raw.get("high"))


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
        inputs: every input tensor, for models that take several (``None``: the one input
            ``input_shape`` / ``input_dtype`` describe).
        input_style: how a batch is passed: ``tensor`` (``model(x)``), ``tuple``
            (``model(*x)``) or ``dict`` (``model(**x)``).
        output: the judged output's name (see :func:`slimkit.io.batch.flatten`); ``None``
            judges the first output tensor.
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
    inputs: tuple[TensorSpec, ...] | None = None
    input_style: str = "tensor"
    output: str | None = None

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Every input tensor's spec (one for a single-tensor model)."""
        if self.inputs:
            return self.inputs
        high = int((self.arch or {}).get("kwargs", {}).get("vocab_size", 2))
        return (TensorSpec("input", tuple(self.input_shape), self.input_dtype, high=high),)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple | dict:
        """Deterministic random inputs of the right shapes and dtypes, as the model takes them:
        a tuple of tensors (``model(*x)``) or, for ``input_style == "dict"``, a dict
        (``model(**x)``); call the model with :func:`slimkit.io.batch.call`."""
        gen = torch.Generator().manual_seed(seed)
        tensors = [spec.example(batch, gen) for spec in self.input_specs]
        if self.input_style == "dict":
            return {spec.name: t for spec, t in zip(self.input_specs, tensors, strict=True)}
        return tuple(tensors)

    def copy(self, module: nn.Module | None = None) -> SlimModel:
        """A deep copy (or this spec around another ``module``)."""
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module) if module is None else module
        new.history = copy.deepcopy(self.history)
        new.arch = copy.deepcopy(self.arch)
        return new

    def input_spec(self) -> dict[str, Any]:
        """What the model takes and which output is judged, as artifacts and ``.slim`` files
        record it: ``shape`` and ``dtype`` of the (first) input, plus, for several inputs,
        every input's spec and how they are passed (``style``), and the judged ``output``."""
        spec: dict[str, Any] = {"shape": list(self.input_shape), "dtype": self.input_dtype}
        if self.inputs:
            spec.update(inputs=[s.to_json() for s in self.inputs], style=self.input_style)
        if self.output:
            spec["output"] = self.output
        return spec

    @staticmethod
    def spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
        """The SlimModel fields an :meth:`input_spec` gives back."""
        inputs = spec.get("inputs")
        return {"input_shape": tuple(spec["shape"]), "input_dtype": spec["dtype"],
                "inputs": tuple(TensorSpec.from_json(s) for s in inputs) if inputs else None,
                "input_style": spec.get("style", "tensor"), "output": spec.get("output")}

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "input_shape": list(self.input_shape),
               "input_dtype": self.input_dtype, "num_classes": self.num_classes,
               "arch": self.arch}
        if self.inputs:
            out["inputs"] = [s.to_json() for s in self.inputs]
            out["input_style"] = self.input_style
        if self.output:
            out["output"] = self.output
        return out
