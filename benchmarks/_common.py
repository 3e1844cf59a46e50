"""Shared helpers for the benchmark scripts (outside the package; each prints JSON)."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from slimkit.io.model import SlimModel


def emit(result: dict[str, Any]) -> None:
    """Print the result with the environment it was measured in."""
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(),
                             "cpu": platform.processor() or platform.machine()}
    json.dump(result, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


@dataclass
class PinnedInputs(SlimModel):
    """A SlimModel whose example inputs are fixed tensors, whatever batch is asked for."""

    pinned: tuple[torch.Tensor, ...] = ()

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return self.pinned


def pinned(model: SlimModel, inputs: Sequence[torch.Tensor]) -> PinnedInputs:
    """``model`` (same module and spec) tracing, measuring and verifying with ``inputs``.

    A technique takes its example inputs from the model (``model.example_inputs(2)``: two
    random samples); a benchmark whose numbers were measured on given inputs (their batch
    sets the absolute FLOPs it reports) keeps them this way.
    """
    spec = {f.name: getattr(model, f.name) for f in fields(SlimModel)}
    return PinnedInputs(**spec, pinned=tuple(inputs))
