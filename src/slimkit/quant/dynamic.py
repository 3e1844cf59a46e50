"""Dynamic INT8 quantization: int8 per-channel weights, activations quantized at run time.

Each selected Linear becomes a :class:`~slimkit.quant.dynamic_linear.DynamicQuantLinear`
(int8 weight codes with one scale per output channel; the input quantized to uint8 at every
call, per row / token or per tensor, the product computed in integers; see that module for
the math and the ONNX export).

Layers can be kept float: by selector (``exclude``), the ``keep_worst`` layers with the largest
relative output error on calibration data, or every layer above ``max_layer_error``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_rebuilder, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.select import select_layers
from slimkit.io import batch as B
from slimkit.io.linear import prepare_layers, shared_weights
from slimkit.io.model import SlimModel, replace_module, set_mode
from slimkit.measure import verify_finite
from slimkit.quant.calibrate import batches_of, check_calibration_inputs, hooked_passes
from slimkit.quant.config import DynamicQuantConfig
from slimkit.quant.dynamic_linear import DynamicQuantLinear
from slimkit.quant.modules import OTHER_TYPES
from slimkit.quant.plan import byte_totals

PLAN_FORMAT = "slimkit-dynamic-quant-plan"


def layer_errors(model: nn.Module, layers: dict[str, nn.Linear], activations: str,
                 batches: Sequence[tuple[torch.Tensor, ...]],
                 reduce_range: bool = False) -> dict[str, float]:
    """Relative output error of each layer once quantized, on its real (float) inputs.

    Streaming: a forward hook compares each float layer's output with its quantized twin's
    on the same input and accumulates the squared norms; nothing is stored per sample.
    """
    twins = {n: DynamicQuantLinear.from_linear(m, activations, reduce_range)
             for n, m in layers.items()}
    sums = {n: [0.0, 0.0] for n in layers}

    def hook(name: str) -> Callable:
        def fn(_: nn.Module, args: tuple, out: torch.Tensor) -> None:
            dq = twins[name](args[0]) - out
            sums[name][0] += float(dq.double().pow(2).sum())
            sums[name][1] += float(out.double().pow(2).sum())
        return fn

    hooked_passes(model, [m.register_forward_hook(hook(n)) for n, m in layers.items()], batches)
    return {n: (num / den) ** 0.5 if den > 0 else 0.0 for n, (num, den) in sums.items()}


def _keep_float(errors: dict[str, float], cfg: DynamicQuantConfig) -> dict[str, str]:
    """Layers to keep float, with the reason."""
    keep: dict[str, str] = {}
    if cfg.max_layer_error is not None:
        for n, e in errors.items():
            if e > cfg.max_layer_error:
                keep[n] = (f"output error {e:.4f} > max_layer_error {cfg.max_layer_error}: "
                           "kept float")
    worst = sorted(errors, key=errors.get, reverse=True)[: cfg.keep_worst]
    for n in worst:
        keep.setdefault(n, f"among the {cfg.keep_worst} most sensitive layers (output error "
                           f"{errors[n]:.4f}): kept float")
    return keep


def _dynamic_quant(model: nn.Module, cfg: DynamicQuantConfig, data: DataBundle | None = None,
                   example_inputs: Sequence[torch.Tensor] | None = None,
                   calib_x: torch.Tensor | None = None) -> tuple[nn.Module, Record]:
    """Replace a copy's Linear layers by :class:`DynamicQuantLinear` (``model`` is untouched).

    Args:
        model: any module with Linear layers.
        cfg: the dynamic quantization config.
        data: calibration data to measure each layer's output error (needed by
            ``keep_worst`` / ``max_layer_error``; optional otherwise).
        example_inputs: inputs for the verification forward pass when no data is given.
        calib_x: calibration inputs given directly (instead of ``data``).

    Returns:
        The quantized copy and a Record: per layer the scheme, bytes before/after and output
        error (when data is given); layers kept float with the reason; ``details["plan"]``.

    Raises:
        ConfigError: no Linear layer selected, bad selectors, sensitivity options without data.
        DataError: calibration inputs empty, constant or non-finite.
        ModelError: the quantized model produces NaN/Inf.

    Example:
        >>> q, rec = dynamic_quant(net, DynamicQuantConfig(keep_worst=1), data)
    """
    work = copy.deepcopy(model)
    chosen, skipped = select_layers(work, ["Linear"], cfg.include, cfg.exclude)
    skipped += [{"what": n, "why": f"{type(m).__name__}: dynamic quantization covers Linear "
                                   "layers only; left float"}
                for n, m in work.named_modules() if type(m).__name__ in OTHER_TYPES]
    if not chosen:
        raise ConfigError("dynamic_quant: the model has no Linear layer to quantize "
                          f"(after include={cfg.include}, exclude={cfg.exclude})")
    if calib_x is None and data is not None:
        calib_x = calibration_subset(data, cfg.calib_samples, cfg.seed)
    if calib_x is None and (cfg.keep_worst or cfg.max_layer_error is not None):
        raise ConfigError("dynamic_quant: keep_worst / max_layer_error measure each layer's "
                          "output error and need calibration data (give --data)")
    errors: dict[str, float] = {}
    if calib_x is not None:
        check_calibration_inputs(calib_x, "dynamic_quant")
        batches = list(batches_of(calib_x, cfg.calib_batch))
        errors = layer_errors(work, chosen, cfg.activations, batches, cfg.reduce_range)
    keep = _keep_float(errors, cfg)
    shared = shared_weights(work)
    plan: dict[str, Any] = {"format": PLAN_FORMAT, "version": 1, "layers": {}}
    for name, layer in chosen.items():
        if name in keep:
            skipped.append({"what": name, "why": keep[name]})
            continue
        replace_module(work, name, DynamicQuantLinear.from_linear(layer, cfg.activations,
                                                                  cfg.reduce_range))
        plan["layers"][name] = _entry(layer, cfg, errors.get(name), shared.get(name))
    verify_finite(work, (B.take(calib_x, slice(0, 2)),) if calib_x is not None else example_inputs,
                 "dynamic_quant")
    set_mode(work, model.training)
    return work, _record(plan, skipped)


def _entry(layer: nn.Linear, cfg: DynamicQuantConfig, error: float | None,
           shared_with: list[str] | None = None) -> dict[str, Any]:
    """The plan entry of one quantized layer: its shape, scheme, bytes and output error.

    A weight other modules also hold (``shared_with``) stays in float for them: quantizing
    frees only the bias bytes, so only those count as before.
    """
    k, n, b = layer.in_features, layer.out_features, layer.bias is not None
    e = {"in_features": k, "out_features": n, "bias": b, "activations": cfg.activations,
         "reduce_range": cfg.reduce_range,
         "weights": f"int{7 if cfg.reduce_range else 8} symmetric per channel",
         "bytes_before": 4 * (n * b + (0 if shared_with else n * k)),
         "bytes_after": n * k + 8 * n + 4 * n * b, "output_rel_error": error}
    if shared_with:
        e["shared_with"] = shared_with
    return e


def _record(plan: dict, skipped: list[dict]) -> Record:
    layers = plan["layers"]
    record = Record(skipped=skipped, details={"plan": plan, "layers": layers})
    for name, e in layers.items():
        err = (f", output error {e['output_rel_error']:.4f}"
               if e["output_rel_error"] is not None else "")
        record.changed.append(f"{name}: {e['weights']}, uint8 activations per "
                              f"{e['activations']}, {e['bytes_before']} -> {e['bytes_after']} B"
                              f"{err}")
    record.details["totals"] = byte_totals(layers)
    return record


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Put an empty :class:`DynamicQuantLinear` at every planned layer (artifact loading).

    Raises:
        ConfigError: not a dynamic-quant plan, or a planned layer that is not a Linear.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not a dynamic quantization plan (format {plan.get('format')!r})")
    modules = dict(model.named_modules())
    for name, e in plan["layers"].items():
        if not isinstance(modules.get(name), nn.Linear):
            raise ConfigError(f"dynamic quantization plan: layer '{name}' is not a Linear of "
                              f"the model.{did_you_mean(name, modules)}")
        replace_module(model, name, DynamicQuantLinear(e["in_features"], e["out_features"],
                                                       e["activations"], e["bias"],
                                                       e.get("reduce_range", False)))
    return list(plan["layers"])


@register_rebuilder("dynamic_quant")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the quantized layers of ``plan``."""
    apply_plan(model, plan)
    return model


@register_stage(DynamicQuantConfig)
def dynamic_quant(model: SlimModel, cfg: DynamicQuantConfig,
                  ctx: StageContext) -> tuple[SlimModel, Record]:
    """Replace a copy's Linear layers by dynamically quantized ones (see :func:`_dynamic_quant`).

    Hugging Face Conv1D layers are converted to Linear first; a tied layer is left float
    unless named in ``include`` (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "dynamic_quant")
    module, record = _dynamic_quant(model.module, cfg, ctx.data,
                                    example_inputs=model.example_inputs(2))
    if record.details["layers"]:
        record.transforms.append(("dynamic_quant", record.details["plan"]))
    return model.copy(module), prep.finish(record)
