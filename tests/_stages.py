"""Run a registered technique through the stage contract on a bare module (test helper)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.record import Record
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel


class FixedInputs(SlimModel):
    """A SlimModel whose example inputs are the given tensors, whatever batch is asked for
    (what the test traces and verifies with)."""

    fixed: tuple[torch.Tensor, ...] = ()

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return self.fixed


def _infer_shape(module: nn.Module) -> tuple[int, ...]:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 8, 8)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 16)
    raise ValueError("give example_inputs: no Linear/Conv layer to infer the input shape from")


def as_model(module: nn.Module | SlimModel, data: DataBundle | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None) -> SlimModel:
    if isinstance(module, SlimModel):
        return module
    if example_inputs is not None:
        x = tuple(example_inputs)
        m = FixedInputs(module=module, input_shape=tuple(x[0].shape[1:]),
                        input_dtype=str(x[0].dtype).removeprefix("torch."))
        m.fixed = x
        return m
    if data is not None:
        return SlimModel(module=module, input_shape=tuple(data.input_shape),
                         input_dtype=str(data.x_train.dtype).removeprefix("torch."),
                         num_classes=data.num_classes)
    return SlimModel(module=module, input_shape=_infer_shape(module))


def stage_on(technique: Any, module: nn.Module | SlimModel, cfg: Any,
             data: DataBundle | None = None, *, teacher: nn.Module | None = None,
             progress: bool = False, checkpoint_dir: str | Path | None = None,
             example_inputs: Sequence[torch.Tensor] | None = None) -> tuple[nn.Module, Record]:
    """``technique(model, cfg, ctx)`` on ``module``; returns the output module and the record."""
    model = as_model(module, data, example_inputs)
    ctx = StageContext(data=data, progress=progress,
                       teacher=None if teacher is None else model.copy(teacher),
                       workdir=None if checkpoint_dir is None else Path(checkpoint_dir))
    out, record = technique(model, cfg, ctx)
    return out.module, record
