"""Shared helpers for the benchmark scripts (outside the package; each prints JSON)."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from slimkit.io.model import SlimModel


def absolute_paths(value: Any, where: str = "") -> list[str]:
    """Key paths (``a.b[2]``) of every string in ``value`` that is an absolute path."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in absolute_paths(v, f"{where}[{i}]")]
    # An absolute path whose top folder exists here (``/tmp/...``, ``/home/...``); ONNX node
    # names such as ``/conv1/Conv`` look alike but name no folder.
    if isinstance(value, str) and os.path.isabs(value) and os.sep in value[1:] \
            and os.path.isdir(os.sep + value.lstrip(os.sep).split(os.sep)[0]):
        return [where.lstrip(".")]
    return []


def emit(result: dict[str, Any]) -> None:
    """Print the result with the environment it was measured in.

    A result JSON holds no absolute path (it would name the machine it ran on): each one
    found is named on stderr, so that the script can record it relative to the repository.
    """
    for key in absolute_paths(result):
        print(f"warning: result key '{key}' holds an absolute path; record it relative to the "
              "repository (or drop it)", file=sys.stderr)
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


def top1_with_ci(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 512) -> tuple[dict[str, Any], torch.Tensor]:
    """Top-1 of ``model`` on ``(x, y)`` with its Wilson 95% interval, and the per-sample
    correctness (a bool tensor) that :func:`paired_difference` compares.

    Returns:
        ``({"value", "ci95", "correct", "n", "method"}, correct)``.
    """
    from slimkit.measure.quality import predict
    from slimkit.measure.stats import accuracy_ci

    hit = predict(model, x, batch_size).argmax(1) == y
    return accuracy_ci(int(hit.sum()), len(hit)), hit


def paired_difference(a_correct: torch.Tensor, b_correct: torch.Tensor) -> dict[str, Any]:
    """Whether two models' accuracies on the *same* samples differ beyond the noise: the exact
    McNemar test (see :func:`slimkit.measure.stats.mcnemar`); ``differs`` at p < 0.05."""
    from slimkit.measure.stats import mcnemar

    return mcnemar(a_correct.numpy(), b_correct.numpy())


def settings_record(args: Any) -> dict[str, Any]:
    """A benchmark's command-line settings for its JSON: paths by their name alone (no
    absolute path is ever recorded)."""
    return {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()}


def data_record(bundle: Any, **extra: Any) -> dict[str, Any]:
    """What a result JSON says about its data: name, split sizes, how validation was held out
    (choices are made on it; the test split is read once, at the end)."""
    meta = bundle.meta or {}
    out = {"name": bundle.name, "n_train": bundle.n_train,
           "n_val": bundle.n_val, "n_test": bundle.n_test,
           "validation": ("held out of training" if getattr(bundle, "y_val", None) is not None
                          else "a slice of the training split"),
           "val_fraction": meta.get("val_fraction"), "val_seed": meta.get("val_seed")}
    return out | extra
