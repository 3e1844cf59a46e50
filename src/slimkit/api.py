"""The Python API: what the CLI calls, and what users call from their own code."""

from __future__ import annotations

from collections.abc import Callable
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


def wrap(module: nn.Module, example_inputs: Any = None, num_classes: int | None = None,
         name: str = "python", output: str | None = None,
         dynamic_axes: dict[str, dict[int, str]] | None = None) -> SlimModel:
    """Describe any ``nn.Module`` by example inputs: a tensor, a tuple or a dict of tensors.

    A Hugging Face model (``from_pretrained``) needs no example: its named inputs and judged
    output come from its config (:func:`slimkit.io.hf.describe_hf`).

    Args:
        example_inputs: one batch as the model takes it: ``model(x)`` for a tensor,
            ``model(*x)`` for a tuple, ``model(**x)`` for a dict (``input_ids``,
            ``attention_mask``...); every tensor has the batch first.
        output: the judged output's name when the model returns several (a tuple's
            ``output_1``, a dict's or ``ModelOutput``'s key); the first output by default.
        dynamic_axes: per input name, the axes besides the batch that vary
            (``{"input_ids": {1: "sequence"}}``); they stay dynamic in ONNX.

    Raises:
        ConfigError: no tensor, a tensor without a batch axis, or an input name or output the
            model does not have. ModelError: the model cannot run on the example.

    Example:
        >>> model = slimkit.wrap(net, torch.randn(1, 1, 28, 28))
        >>> enc = slimkit.wrap(bert, {"input_ids": ids, "attention_mask": mask},
        ...                    output="last_hidden_state",
        ...                    dynamic_axes={"input_ids": {1: "sequence"},
        ...                                  "attention_mask": {1: "sequence"}})
    """
    from slimkit.io import batch as B
    from slimkit.io.model import TensorSpec

    if example_inputs is None:
        if not _is_hf(module):
            raise ConfigError("example_inputs: give one batch as the model takes it (only "
                              "Hugging Face models describe their own inputs)")
        from slimkit.io.hf import describe_hf

        model = describe_hf(set_mode(module, False), name=name)
        model.output = output or model.output
        model.num_classes = num_classes or model.num_classes
        return model
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if isinstance(example_inputs, tuple) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    tensors, input_names = B.leaves(example_inputs), B.names(example_inputs)
    if not tensors or (isinstance(example_inputs, tuple | dict)
                       and len(tensors) != len(example_inputs)):
        raise ConfigError("example_inputs: give a tensor, a tuple or a dict of tensors")
    for key, t in zip(input_names, tensors, strict=True):
        if t.dim() < 1 or (len(tensors) == 1 and t.dim() < 2):
            raise ConfigError(f"example_inputs: expected a batch [N, ...] for '{key}', got "
                              f"shape {tuple(t.shape)}")
    B.size(example_inputs)  # one batch axis for all
    dynamic_axes = dynamic_axes or {}
    unknown = sorted(set(dynamic_axes) - set(input_names))
    if unknown:
        raise ConfigError(f"dynamic_axes: no input named '{unknown[0]}'; the inputs are "
                          f"{', '.join(input_names)}")
    shapes = (f"an input of shape {tuple(tensors[0].shape)}" if len(tensors) == 1 else "inputs "
              + ", ".join(f"{k} {tuple(t.shape)}" for k, t in zip(input_names, tensors,
                                                                  strict=True)))
    try:
        with torch.inference_mode():
            out = B.call(set_mode(module, False), example_inputs)
    except Exception as exc:
        raise ModelError(f"model '{name}' cannot run on {shapes}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    try:
        judged = B.select(out, output)
    except ModelError as exc:
        raise ConfigError(f"output: {exc}") from None
    specs = tuple(TensorSpec(key, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."),
                             {int(a): str(n) for a, n in dynamic_axes.get(key, {}).items()},
                             int(t.max()) + 1 if not t.is_floating_point() and t.numel() else None)
                  for key, t in zip(input_names, tensors, strict=True))
    style = ("dict" if isinstance(example_inputs, dict)
             else "tuple" if isinstance(example_inputs, tuple) else "tensor")
    single = style == "tensor" and not specs[0].dynamic and specs[0].high is None
    from slimkit.io.hf import hf_arch

    return SlimModel(module=module, input_shape=specs[0].shape, input_dtype=specs[0].dtype,
                     name=name, inputs=None if single else specs, input_style=style,
                     output=output, arch=hf_arch(module) if _is_hf(module) else None,
                     num_classes=num_classes or (judged.shape[1] if judged.dim() == 2 else None))


def _is_hf(module: nn.Module) -> bool:
    return hasattr(module, "config") and hasattr(module, "save_pretrained")


def compress(model: SlimModel | nn.Module, data: DataBundle | None, recipe: Any,
             out: str | Path, example_inputs: Any = None,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] = print,
             keep_checkpoints: bool = False, track: str | None = None) -> CompressResult:
    """Compress ``model`` with ``recipe`` (a path, YAML text, dict or Recipe); see the runner.

    Example:
        >>> report = slimkit.compress(net, data, "recipe.yaml", "out/",
        ...                           example_inputs=data.example_inputs())
        >>> report["verdict"]["met"], report.model, report.onnx  # see CompressResult
    """
    if isinstance(model, nn.Module):
        if example_inputs is None and data is None and not _is_hf(model):
            raise ConfigError("compress: a plain nn.Module needs example_inputs or data")
        example = (example_inputs if example_inputs is not None or _is_hf(model)
                   else data.example_inputs(2))
        model = wrap(model, example, num_classes=data.num_classes if data else None)
    if not hasattr(recipe, "stages"):
        recipe = load_recipe(recipe)
    report = _run(model, data, recipe, out, overwrite=overwrite, resume=resume,
                  progress=progress, log=log, keep_checkpoints=keep_checkpoints, track=track)
    return CompressResult(report, template=model.module)


def search(model: SlimModel | nn.Module, data: DataBundle, recipe: Any, out: str | Path,
           example_inputs: Any = None, **kwargs: Any) -> Any:
    """Search the recipe's ``search:`` space for the recipe meeting its ``target:`` with the
    best objective; see :func:`slimkit.search.run.search` (``storage``, ``worker``,
    ``trials``, ``overwrite``, ``require_target``, ``log``).

    Example:
        >>> result = slimkit.search(net, data, "recipe.yaml", "search-out/")
        >>> slimkit.compress(net, data, result.recipe_path, "out/")
    """
    from slimkit.search.run import search as _search

    if isinstance(model, nn.Module):
        example = example_inputs if example_inputs is not None or _is_hf(model) \
            else data.example_inputs(2)
        model = wrap(model, example, num_classes=data.num_classes if data else None)
    return _search(model, data, recipe, out, **kwargs)


class CompressResult(dict):
    """What ``compress`` gives back: the report (this dict, as in ``report.json``) plus the
    compressed model and the paths of what was written.

    Attributes:
        model: the compressed model, loaded from the artifact on first use: in the user's own
            class when the weights fit it (no structural change), in its transformers or zoo
            class (rebuilt and replayed) when it has one, else as a ``torch.export`` graph.
        artifact, onnx, html: the paths written (``onnx`` None when the export failed).
    """

    def __init__(self, report: dict[str, Any], template: nn.Module | None = None) -> None:
        super().__init__(report)
        self._template = template
        self._model: SlimModel | None = None
        outputs = report.get("outputs") or {}
        self.artifact = Path(outputs["artifact"]) if outputs.get("artifact") else None
        self.onnx = Path(outputs["onnx"]) if outputs.get("onnx") else None
        self.html = self.artifact.parent / "report.html" if self.artifact else None

    @property
    def report(self) -> dict[str, Any]:
        return dict(self)

    @property
    def model(self) -> SlimModel:
        if self._model is None:
            from slimkit.io.artifact import load_artifact

            if self.artifact is None:
                raise ConfigError("this run wrote no artifact (a worker rank under torchrun)")
            self._model = load_artifact(self.artifact, template=self._template)
        return self._model


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
