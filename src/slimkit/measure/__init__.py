"""Honest measurement: counts, FLOPs, memory, latency, accuracy, fidelity. Never mutates."""

from __future__ import annotations

from typing import Any

import torch

from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure.counts import count_flops, count_params, layer_table, layer_units
from slimkit.measure.latency import compare_latency, ort_session, ratio_ci, time_interleaved
from slimkit.measure.memory import peak_memory
from slimkit.measure.quality import accuracy, fidelity, output_fidelity, predict


def measure_static(model: SlimModel, data: DataBundle | None = None,
                   layers: bool = False, reference: torch.nn.Module | None = None,
                   split: str = "test") -> dict[str, Any]:
    """Everything about one model that needs no second model and no timing.

    Parameters are the weights the model computes with, whatever their dtype: a quantized
    model has as many as its float original, stored in fewer ``bits_per_param``.

    Returns:
        ``params``, ``nonzero_params``, ``bits_per_param`` (mean stored width of a parameter:
        code width for quantized weights, dtype width otherwise), ``flops``/``macs`` per
        sample, ``peak_memory_bytes`` at batch 1, ``accuracy`` on ``data``'s test split (None
        without data or for tasks other than classification), ``metrics``: the data's task's
        metrics (:mod:`slimkit.measure.tasks`; an embedding's against ``reference``, the
        uncompressed model), and with ``layers`` the per-layer table (:func:`layer_table`:
        one row per layer under its original name, with ``weight_bits`` and stored
        ``bytes``), ``split``: the split the metrics are on (``test`` by default; the runner
        measures stages on ``val``), and for classification ``accuracy_ci95``: top-1's
        Wilson 95% interval on the number of samples evaluated
        (:func:`slimkit.measure.stats.accuracy_ci`).
    """
    example = data.example_inputs(1) if data is not None else model.example_inputs(1)
    out: dict[str, Any] = dict(count_params(model.module, bits=True))
    flops = count_flops(model.module, example)
    out.update(flops=flops["flops"], macs=flops["macs"])
    out["peak_memory_bytes"] = peak_memory(model.module, example)["peak_memory_bytes"]
    out["metrics"] = None
    if data is not None:
        from slimkit.measure.stats import accuracy_ci_of
        from slimkit.measure.tasks import get_task

        seen = [0]

        def counted() -> Any:
            for x, y in data.batches(split):
                seen[0] += len(y)
                yield x, y

        with B.judging(model.output):
            out["metrics"] = get_task(data.task).evaluate(model.module, counted, reference)
        out["split"] = split
        if data.task == "classification":
            out["accuracy_ci95"] = accuracy_ci_of(out["metrics"]["top1"], seen[0])
    out["accuracy"] = (out["metrics"] if data is not None and data.task == "classification"
                       else None)
    if layers:
        out["layers"] = layer_table(model.module, example)
    return out


def verify_finite(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...] | None, where: str,
                  hint: str = "") -> torch.Tensor | None:
    """A stage's self-check: NaN/Inf in any float tensor of the state, or in the output of a
    forward pass on ``inputs`` (eval mode), is a ModelError naming ``where`` and the tensor.

    Returns:
        The output on ``inputs`` (None when no inputs are given).
    """
    from slimkit.core.errors import ModelError

    for name, p in module.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(f"{where}: parameter '{name}' holds NaN/Inf{hint}")
    if inputs is None:
        return None
    set_mode(module, False)
    with torch.inference_mode():
        out = B.call(module, inputs)
    for name, t in B.flatten(out).items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            which = "output" if name == "output" else f"output '{name}'"
            raise ModelError(f"{where}: the model's {which} holds NaN/Inf{hint}")
    return out


def check_finite(model: SlimModel, inputs: tuple[torch.Tensor, ...], where: str) -> None:
    """Raise ModelError when parameters or outputs hold NaN/Inf (naming the tensor)."""
    verify_finite(model.module, inputs, where)


def _check_inputs(model: SlimModel, data: DataBundle) -> None:
    """The data's inputs against the model's: names (for dict inputs), count, shapes apart
    from the dynamic axes."""
    from slimkit.core.errors import DataError

    if not model.inputs:
        return
    example = data.example_inputs(2)
    names, tensors = B.names(example), B.leaves(example)
    if model.input_style == "dict":
        want = [s.name for s in model.inputs]
        missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
        if missing or extra:
            raise DataError(f"data '{data.name}' gives inputs {', '.join(names)} but model "
                            f"'{model.name}' takes {', '.join(want)}"
                            + (f" (missing: {', '.join(missing)})" if missing else "")
                            + (f" (not taken: {', '.join(extra)})" if extra else ""))
        given = dict(zip(names, tensors, strict=True))
        tensors = [given[n] for n in want]
    elif len(tensors) != len(model.inputs):
        raise DataError(f"data '{data.name}' gives {len(tensors)} input tensors but model "
                        f"'{model.name}' takes {len(model.inputs)}")
    for spec, t in zip(model.inputs, tensors, strict=True):
        shape = list(t.shape[1:])
        fixed = [d for i, d in enumerate(shape, 1) if i not in spec.dynamic]
        want_fixed = [d for i, d in enumerate(spec.shape, 1) if i not in spec.dynamic]
        if len(shape) != len(spec.shape) or fixed != want_fixed:
            raise DataError(f"data '{data.name}' gives input '{spec.name}' samples of shape "
                            f"{tuple(shape)} but model '{model.name}' takes "
                            f"{tuple(spec.shape)} (dynamic axes: {spec.dynamic or 'none'})")


def check_fits(model: SlimModel, data: DataBundle | None) -> None:
    """Raise DataError/ModelError when ``data`` cannot feed ``model`` (shape, classes)."""
    from slimkit.core.errors import DataError, ModelError

    if data is None:
        return
    _check_inputs(model, data)
    if not model.inputs and tuple(data.input_shape) != tuple(model.input_shape):
        raise DataError(f"data '{data.name}' gives samples of shape {tuple(data.input_shape)} "
                        f"but model '{model.name}' takes {tuple(model.input_shape)}; "
                        "use data that fits the model")
    try:
        check_finite(model, data.example_inputs(2), f"model '{model.name}'")
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ModelError(f"model '{model.name}' cannot run on data '{data.name}' (sample shape "
                         f"{tuple(data.input_shape)}): {str(exc).splitlines()[0]}") from None
    if model.num_classes and data.num_classes > model.num_classes:
        raise DataError(f"data '{data.name}' has {data.num_classes} classes but model "
                        f"'{model.name}' outputs {model.num_classes}")


__all__ = [
    "accuracy",
    "check_finite",
    "check_fits",
    "compare_latency",
    "count_flops",
    "count_params",
    "fidelity",
    "output_fidelity",
    "layer_table",
    "layer_units",
    "measure_static",
    "ort_session",
    "peak_memory",
    "predict",
    "ratio_ci",
    "time_interleaved",
]
