"""Run calibration data through a model with observers hooked on chosen layer inputs/outputs.

Statistics only: nothing here changes the model. The hooks are removed even when a batch fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError, did_you_mean
from slimkit.io.model import set_mode
from slimkit.quant.observers import Observer


def batches_of(data: torch.Tensor, batch_size: int) -> Iterable[tuple[torch.Tensor]]:
    """``data`` in consecutive batches along dim 0, as 1-tuples of model inputs."""
    return ((data[i:i + batch_size],) for i in range(0, len(data), batch_size))


def hooked_passes(model: nn.Module, handles: list, batches: Iterable[tuple[torch.Tensor, ...]],
                  ) -> None:
    """Run ``batches`` through ``model`` in eval + inference mode with hooks already attached.

    The hooks are removed and every module's train/eval flag restored afterwards, even when a
    batch fails.
    """
    flags = {m: m.training for m in model.modules()}
    try:
        set_mode(model, False)
        with torch.inference_mode():
            for batch in batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in flags.items():
            m.training = training


def collect(model: nn.Module, points: dict[str, tuple[str, str]],
            make: Callable[[str], Observer], data: torch.Tensor,
            batch_size: int = 64) -> dict[str, Observer]:
    """Observe tensors while ``model`` runs on ``data``.

    Args:
        model: the model (put in eval mode; not otherwise changed).
        points: ``{key: (module_name, "input" | "output")}``: the first positional input of a
            module, or its output.
        make: builds the observer for a key.
        data: calibration inputs, batched along dim 0.
        batch_size: samples per forward pass (memory is bounded by one batch).

    Returns:
        ``{key: observer}`` after every batch has been seen.

    Raises:
        ConfigError: a module name not in the model.
        DataError: empty calibration data, or NaN/Inf reaching a layer (named).

    Example:
        >>> obs = collect(net, {"fc1:input": ("fc1", "input")},
        ...               lambda k: make_observer("percentile", k), calib)  # doctest: +SKIP
        >>> lo, hi = obs["fc1:input"].range()  # doctest: +SKIP
    """
    if len(data) == 0:
        raise DataError("calibration data is empty: give at least one sample")
    modules = dict(model.named_modules())
    observers = {key: make(key) for key in points}
    handles = []
    for key, (name, where) in points.items():
        if name not in modules:
            raise ConfigError(f"calibration point '{key}': layer '{name}' is not in the model."
                              f"{did_you_mean(name, modules)}")
        obs = observers[key]
        if where == "input":
            handles.append(modules[name].register_forward_pre_hook(
                lambda _m, args, o=obs: o.update(args[0])))
        else:
            handles.append(modules[name].register_forward_hook(
                lambda _m, _a, out, o=obs: o.update(out)))
    hooked_passes(model, handles, batches_of(data, batch_size))
    return observers
