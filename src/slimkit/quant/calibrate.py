"""Run calibration data through a model with observers hooked on chosen layer inputs/outputs.

Statistics only: the passes change nothing in the model, and the hooks are removed even when a
batch fails. :func:`calibrate_inputs` is the one step that applies them, setting the input
quantizers' qparams. The checks refuse calibration data that cannot give ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError, did_you_mean
from slimkit.io import batch as B
from slimkit.measure.hooks import hooked_passes
from slimkit.quant.observers import Observer, make_observer

if TYPE_CHECKING:
    from slimkit.quant.modules import QuantLayer


def batches_of(data: Any, batch_size: int) -> Iterable[tuple]:
    """``data`` (a tensor, tuple or dict batch) in consecutive batches along dim 0, as
    1-tuples of model inputs (see :func:`slimkit.io.batch.call`)."""
    return ((B.take(data, slice(i, i + batch_size)),)
            for i in range(0, B.size(data), batch_size))


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


def check_calibration(x: Any, what: str = "calibration data") -> None:
    """Refuse calibration inputs that cannot give activation ranges (QAT, mixed precision).

    For several inputs, every one is checked for NaN/Inf and the first (the pixels or token
    ids; an attention mask of all ones is fine) for constancy.

    Raises:
        DataError: empty, NaN/Inf, or constant (e.g. all zeros) inputs.
    """
    tensors = B.leaves(x)
    for t in tensors[1:]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{what} holds NaN/Inf values: clean the dataset first")
    x = tensors[0] if tensors else torch.empty(0)
    if x.numel() == 0:
        raise DataError(f"{what} is empty: give at least one training sample")
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise DataError(f"{what} holds NaN/Inf values: clean the dataset first")
        if float(x.amax() - x.amin()) == 0.0:
            raise DataError(f"{what} is constant (every value {float(x.flatten()[0]):g}): "
                            "activation ranges would be empty; use real samples")


def check_calibration_inputs(inputs: Any, where: str) -> Any:
    """Raise DataError for calibration inputs that are empty, non-finite or constant.

    The messages start with ``where`` (the stage name); integer inputs (token ids) are
    checked for constancy too. :func:`check_calibration` is the variant for training data.
    For several inputs, every one is checked for NaN/Inf and the first for constancy.

    Returns:
        ``inputs`` unchanged.
    """
    tensors = B.leaves(inputs)
    for t in tensors[1:]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{where}: the calibration inputs hold "
                            f"{int((~torch.isfinite(t)).sum())} NaN/Inf values; "
                            "clean the data before quantizing")
    x = tensors[0] if tensors else torch.empty(0)
    if x.numel() == 0:
        raise DataError(f"{where}: the calibration set is empty; give data with samples")
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{where}: the calibration inputs hold {bad} NaN/Inf values; "
                            "clean the data before quantizing")
    if bool((x == x.flatten()[0]).all()):
        raise DataError(f"{where}: the calibration inputs are constant (every value is "
                        f"{float(x.flatten()[0]):g}); give real samples so activations vary")
    return inputs


def calibrate_inputs(model: nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                     method: str = "minmax", batch_size: int = 64) -> dict[str, list[float]]:
    """Set every layer's input quantizer from a calibration pass (slimkit.quant.observers).

    Input quantizers are bypassed during the pass (weights stay fake-quantized), so each
    layer sees the float activations it will see at the start of training.

    Args:
        layers: the QuantLayers by name; those with an ``input_fq`` are calibrated.
        x: calibration inputs.
        method: a ``CALIBRATORS`` name: minmax, percentile, mse or entropy.

    Returns:
        ``{name: [min, max]}``: the range each input quantizer was set from.

    Raises:
        DataError: empty data or NaN/Inf reaching a layer (named).
        ConfigError: unknown method.
    """
    saved = {n: ql.input_fq for n, ql in layers.items() if ql.input_fq is not None}
    for n in saved:
        layers[n].input_fq = None
    try:
        obs = collect(model, {n: (n, "input") for n in saved},
                      lambda n: make_observer(method, n, bits=saved[n].bits,
                                              symmetric=saved[n].symmetric,
                                              signed=saved[n].signed, narrow=saved[n].narrow),
                      x, batch_size)
    finally:
        for n, fq in saved.items():
            layers[n].input_fq = fq
    ranges = {}
    for n, fq in saved.items():
        lo, hi = obs[n].range()
        fq.set_range(lo, hi)
        ranges[n] = [float(lo.min()), float(hi.max())]
    return ranges
