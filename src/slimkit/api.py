"""The Python API: what the CLI calls, and what users call from their own code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.data.bundle import DataBundle
from slimkit.io.artifact import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel, set_mode
from slimkit.pipeline.recipe import load_recipe
from slimkit.pipeline.runner import compress as _run
from slimkit.train.distributed import world
from slimkit.train.loop import TrainConfig, fit


def wrap(module: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
         num_classes: int | None = None, name: str = "python") -> SlimModel:
    """Describe any ``nn.Module`` by its example inputs (one tensor input, batch first).

    Example:
        >>> model = slimkit.wrap(net, torch.randn(1, 1, 28, 28))
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if len(example_inputs) != 1:
        raise ConfigError(f"example_inputs: slimkit models take one input tensor, got "
                          f"{len(example_inputs)}")
    x = example_inputs[0]
    if x.dim() < 2:
        raise ConfigError(f"example_inputs: expected a batch [N, ...], got shape {tuple(x.shape)}")
    try:
        with torch.inference_mode():
            out = set_mode(module, False)(x)
    except Exception as exc:
        raise ModelError(f"model '{name}' cannot run on an input of shape {tuple(x.shape)}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model '{name}' must return one tensor, got {type(out).__name__}")
    return SlimModel(module=module, input_shape=tuple(x.shape[1:]),
                     input_dtype=str(x.dtype).removeprefix("torch."), name=name,
                     num_classes=num_classes or (out.shape[1] if out.dim() == 2 else None))


def compress(model: SlimModel | nn.Module, data: DataBundle | None, recipe: Any,
             out: str | Path, example_inputs: Sequence[torch.Tensor] | None = None,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] = print,
             keep_checkpoints: bool = False) -> dict[str, Any]:
    """Compress ``model`` with ``recipe`` (a path, YAML text, dict or Recipe); see the runner.

    Example:
        >>> report = slimkit.compress(net, data, "recipe.yaml", "out/",
        ...                           example_inputs=data.example_inputs())
        >>> report["verdict"]["met"]
    """
    if isinstance(model, nn.Module):
        if example_inputs is None and data is None:
            raise ConfigError("compress: a plain nn.Module needs example_inputs or data")
        example = example_inputs if example_inputs is not None else data.example_inputs(2)
        model = wrap(model, example,
                     num_classes=data.num_classes if data else None)
    if not hasattr(recipe, "stages"):
        recipe = load_recipe(recipe)
    return _run(model, data, recipe, out, overwrite=overwrite, resume=resume,
                progress=progress, log=log, keep_checkpoints=keep_checkpoints)


def train_zoo(name: str, data: DataBundle, config: TrainConfig, out: str | Path | None = None,
              overwrite: bool = False, progress: bool = True,
              **kwargs: Any) -> tuple[SlimModel, dict]:
    """Train a zoo architecture on ``data``; save it as an artifact when ``out`` is given."""
    torch.manual_seed(config.seed)
    model = load_zoo(name, data, **kwargs)
    history = fit(model.module, data, config, progress=progress, label=f"train {name}")
    model.history.append({"kind": "train", "config": config.model_dump(mode="json"),
                          "data": data.name, "epochs": history["epochs"]})
    if out is not None and world()[0] == 0:  # under torchrun, rank 0 writes
        save_artifact(model, out, overwrite=overwrite)
    return model, history
