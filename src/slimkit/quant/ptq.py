"""Post-training static INT8 quantization (weights per-channel int8, activations per-tensor).

The pipeline (each step a separate module, plan first, then apply):

1. fold BatchNorm into the preceding Conv/Linear (:mod:`slimkit.quant.fold`);
2. optionally equalize conv -> ReLU -> conv ranges (:mod:`slimkit.quant.equalize`) or smooth
   transformer activations into weights (:mod:`slimkit.quant.smoothquant`);
3. plan: which layers get which quantizers. Every layer quantizes its input; its output is
   quantized with the *next* layer's input qparams when only max pooling, shape ops or a ReLU
   lie between them (``Q(relu(maxpool(y))) == relu(maxpool(Q(y)))`` when the zero point is the
   lowest code), otherwise with its own. In ONNX this gives ``DQ -> Conv -> Q`` groups that
   ONNX Runtime fuses into integer kernels, with no float island between them;
4. calibrate the float model with streaming observers (:mod:`slimkit.quant.observers`);
5. wrap, set qparams, put biases on the int32 grid ``s_x * s_w`` the integer kernels use,
   optionally correct the bias for the weight rounding error (:mod:`slimkit.quant.bias_correction`),
   and freeze (int8 codes replace the float weights).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.chains import output_links
from slimkit.graph.select import select_layers
from slimkit.io import batch as B
from slimkit.io.linear import prepare_layers
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure import verify_finite
from slimkit.quant.calibrate import collect
from slimkit.quant.config import PtqConfig
from slimkit.quant.fold import fold_batchnorms
from slimkit.quant.modules import QUANTIZABLE, QuantLayer, snap_bias
from slimkit.quant.observers import make_observer
from slimkit.quant.outputs import attach_output_quantizers, plan_residuals
from slimkit.quant.plan import QuantSpec, freeze, wrap_layers
from slimkit.quant.primitives import choose_qparams, qrange


def _calibration_data(data: DataBundle | torch.Tensor | None, cfg: PtqConfig) -> torch.Tensor:
    if data is None:
        raise DataError("ptq needs calibration data: give a dataset (--data) or a tensor")
    if isinstance(data, DataBundle) or getattr(data, "streaming", False):
        return calibration_subset(data, cfg.num_samples, cfg.seed)
    if not B.leaves(data) or B.size(data) == 0:
        raise DataError("ptq: the calibration tensor is empty")
    return B.take(data, slice(0, cfg.num_samples))


def act_spec(cfg: PtqConfig) -> QuantSpec:
    """The activation quantizer: 8-bit asymmetric per tensor, uint8 or int8 codes."""
    return QuantSpec(bits=8, symmetric=False, signed=cfg.activations == "int8")


def weight_spec(cfg: PtqConfig) -> QuantSpec:
    """The weight quantizer: symmetric signed, per output channel or per tensor."""
    bits = 7 if cfg.reduce_range and cfg.weight_bits == 8 else cfg.weight_bits
    return QuantSpec(bits=bits, symmetric=True, signed=True,
                     granularity=cfg.weight_granularity, narrow=cfg.weight_narrow)


def _observer_kwargs(cfg: PtqConfig) -> dict[str, Any]:
    a = act_spec(cfg)
    kw: dict[str, Any] = {"bits": a.bits, "symmetric": a.symmetric, "signed": a.signed}
    if cfg.calibration == "percentile":
        kw["percentile"] = cfg.percentile
    return kw


def plan_ptq(model: nn.Module, cfg: PtqConfig,
             example: Any = None) -> tuple[dict[str, dict], list[dict]]:
    """Which layers are quantized and where their output quantizer comes from.

    Returns:
        ``(layers, skipped)``: ``layers[name] = {"consumer": layer or None, "through": [...],
        "relu": bool}`` in model order; ``skipped`` lists ``{"what", "why"}``.

    Raises:
        ConfigError: no quantizable layer is selected.
    """
    chosen, skipped = select_layers(model, QUANTIZABLE, cfg.include, cfg.exclude)
    for name, mod in list(chosen.items()):
        if not isinstance(mod, nn.modules.conv._ConvNd):
            continue
        reduction = mod.weight[0].numel()  # in_channels / groups x kernel area
        if mod.padding_mode != "zeros":
            skipped.append({"what": name, "why": f"padding_mode '{mod.padding_mode}' has no "
                                                 "integer kernel"})
            del chosen[name]
        elif reduction < cfg.min_conv_reduction:
            skipped.append({"what": name, "why": f"reduction size {reduction} < "
                            f"min_conv_reduction {cfg.min_conv_reduction}: the integer conv "
                            "would run slower than float; kept float"})
            del chosen[name]
    if not chosen:
        raise ConfigError("ptq: the model has no Linear/Conv layer left to quantize (check "
                          "include/exclude)")
    links = output_links(model, set(chosen), example)
    if links is None:
        skipped.append({"what": "output sharing", "why": "the model could not be traced (torch.fx) "
                        "nor captured (torch.export); every "
                        "layer quantizes its own output"})
        links = {n: {"consumer": None, "through": [], "relu": False, "relu_module": None}
                 for n in chosen}
    return {n: links[n] for n in chosen}, skipped


def _calibrate(model: nn.Module, layers: dict[str, dict], cfg: PtqConfig,
               calib: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Observe every layer input, and the outputs not served by a consumer's input."""
    points = {f"{n}:input": (n, "input") for n in layers}
    # An output followed by a ReLU is observed after it: the range then starts at 0, the zero
    # point is the lowest code, and the quantizer makes the ReLU a no-op the export drops.
    points |= {f"{n}:output": (link.get("relu_module") or n, "output")
               for n, link in layers.items() if link["consumer"] is None}
    kw = _observer_kwargs(cfg)
    obs = collect(model, points, lambda key: make_observer(cfg.calibration, key, **kw), calib,
                  cfg.batch_size)
    return {k: o.range() for k, o in obs.items()}


def _output_range(name: str, link: dict, ranges: dict, spec: QuantSpec,
                  notes: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The output range of ``name``: its consumer's input range when that is exact."""
    if link["consumer"] is None:
        lo, hi = ranges[f"{name}:output"]
        relu = link.get("relu_module") is not None
    else:
        lo, hi = ranges[f"{link['consumer']}:input"]
        relu = link["relu"]
    if relu:
        qmin = qrange(spec.bits, spec.signed, spec.narrow)[0]
        _, zero = choose_qparams(lo, hi, spec.bits, spec.symmetric, spec.signed, spec.narrow)
        if int(zero.flatten()[0]) != qmin:
            notes.append({"what": f"{name} output", "why": "a ReLU follows: quantizing before "
                          "it needs the zero point at the lowest code; output left in float"})
            return None
    return lo, hi


def _describe(name: str, ql: QuantLayer, link: dict, cfg: PtqConfig) -> dict[str, Any]:
    def rng(fq: Any) -> list[float] | None:
        if fq is None:
            return None
        lo = (float(fq.qmin) - float(fq.zero_point)) * float(fq.scale)
        return [lo, (float(fq.qmax) - float(fq.zero_point)) * float(fq.scale)]

    return {"bits": ql.weight_fq.bits, "storage": "int8", "scheme": "symmetric", "granularity":
            cfg.weight_granularity, "activation": f"{cfg.activations} asymmetric per-tensor",
            "calibration": cfg.calibration, "input_range": rng(ql.input_fq),
            "output_range": rng(ql.output_fq),
            "output_shared_with": link["consumer"] if ql.output_fq is not None else None,
            "through": link["through"]}


def _ptq(model: nn.Module, cfg: PtqConfig, data: DataBundle | torch.Tensor | None,
         ) -> tuple[nn.Module, Record]:
    """Quantize a copy of ``model`` to static INT8 with calibration data.

    Args:
        model: the float model (not modified).
        cfg: the PTQ settings.
        data: a DataBundle (a class-stratified calibration subset is drawn from its training
            set) or a tensor of calibration inputs.

    Returns:
        The quantized model (frozen QuantLayers holding int8 codes) and a Record whose details
        hold the replayable ``plan``, the folded ``bn_pairs`` and per-layer settings.

    Raises:
        ConfigError: nothing to quantize. DataError: no/empty/non-finite calibration data.
        ModelError: the quantized model produces NaN/Inf.

    Example:
        >>> qmodel, record = ptq(model, PtqConfig(calibration="mse"), bundle)
    """
    calib = _calibration_data(data, cfg)
    m = copy.deepcopy(model)
    set_mode(m, False)
    record = Record()
    # torch.export needs an example batch for models torch.fx cannot trace (Hugging Face).
    example = B.take(calib, slice(0, 2))
    pairs, unfolded = fold_batchnorms(m, example) if cfg.fold_bn else ([], [])
    record.skipped += unfolded
    record.changed += [f"{bn}: folded into {layer}" for layer, bn in pairs]
    record.details.update(_prepare(m, cfg, calib, record))
    layers, skipped = plan_ptq(m, cfg, example)
    record.skipped += skipped
    residual = plan_residuals(m, layers, example, record)
    ranges = _calibrate(m, layers, cfg, calib)
    a_spec, w_spec = act_spec(cfg), weight_spec(cfg)
    plan: dict[str, dict] = {}
    outs = {}
    for name, link in layers.items():
        outs[name] = _output_range(name, link, ranges, a_spec, record.skipped)
        plan[name] = {"weight": w_spec.model_dump(), "input": a_spec.model_dump(),
                      "output": a_spec.model_dump() if outs[name] is not None else None}
    wrapped = wrap_layers(m, plan)
    for name, ql in wrapped.items():
        ql.input_fq.set_range(*ranges[f"{name}:input"])
        if ql.output_fq is not None:
            ql.output_fq.set_range(*outs[name])
    for name, fq in attach_output_quantizers(m, {k: a_spec.model_dump()
                                                 for k in residual}).items():
        fq.set_range(*ranges[f"{residual[name]}:input"])
    if cfg.bias_correction:
        from slimkit.quant.bias_correction import correct_biases

        record.details["bias_correction"] = correct_biases(m, wrapped, calib, cfg.batch_size)
    record.skipped += [{"what": f"{n} bias", "why": "exceeds the int32 range of s_x * s_w "
                        "(tiny input scale: constant calibration data?); clipped"}
                       for n, ql in wrapped.items() if snap_bias(ql)]
    freeze(m)
    verify_finite(m, (B.take(calib, slice(0, cfg.batch_size)),), "ptq")
    record.details["layers"] = {n: _describe(n, wrapped[n], layers[n], cfg) for n in wrapped}
    record.changed += [f"{n}: int{wrapped[n].weight_fq.bits} weights ({cfg.weight_granularity}), "
                       f"{cfg.activations} activations ({cfg.calibration})" for n in wrapped]
    record.details.update({"plan": {"layers": plan, "frozen": True}, "bn_pairs": pairs,
                           "calibration": cfg.calibration, "num_samples": B.size(calib),
                           "residual_outputs": residual})
    return m, record


def _prepare(m: nn.Module, cfg: PtqConfig, calib: torch.Tensor, record: Record) -> dict:
    """Float-equivalent rewrites before quantization (equalization, SmoothQuant)."""
    details: dict[str, Any] = {}
    if cfg.equalize:
        from slimkit.quant.equalize import equalize

        details["equalized"] = equalize(m)
        record.changed += [f"{a} / {b}: equalized" for a, b in details["equalized"]]
    if cfg.smoothquant:
        details["smoothed"] = _smoothquant(m, cfg, calib, record)
    return details


def _smoothquant(m: nn.Module, cfg: PtqConfig, calib: torch.Tensor,
                 record: Record) -> dict[str, str]:
    """SmoothQuant on the Linear layers PTQ will quantize; each one it cannot smooth is
    recorded as skipped with the reason (the option never goes silently unused)."""
    from slimkit.quant.smoothquant import smooth

    targets = set(select_layers(m, ("Linear",), cfg.include, cfg.exclude)[0])
    if not targets:
        record.skipped.append({"what": "smoothquant", "why": "SmoothQuant moves Linear input "
                               "outliers into weights, and no Linear layer is quantized here "
                               "(none in the model, or none left by include/exclude)"})
        return {}
    smoothed, skipped = smooth(m, calib, cfg.smoothquant_alpha, cfg.batch_size, targets)
    record.changed += [f"{n}: input smoothed into {src} (SmoothQuant, alpha "
                       f"{cfg.smoothquant_alpha})" for n, src in smoothed.items()]
    record.skipped += skipped
    return smoothed


@register_stage(PtqConfig)
def ptq(model: SlimModel, cfg: PtqConfig, ctx: StageContext) -> tuple[SlimModel, Record]:
    """Quantize a copy of ``model`` to static INT8, calibrated on ``ctx.data`` (see :func:`_ptq`).

    The record also says which nodes ONNX Runtime runs as integer kernels (``ort_int8``);
    float fallbacks are listed as skipped.

    Hugging Face Conv1D layers are converted to Linear first; a tied layer is left float
    unless named in ``include`` (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "ptq")
    module, record = _ptq(model.module, cfg, ctx.data)
    # The structure changed (BatchNorm folded, layers wrapped): artifacts replay both.
    if record.details["bn_pairs"]:
        record.transforms.append(("bn_fold", {"pairs": [list(p) for p in
                                                        record.details["bn_pairs"]]}))
    record.transforms.append(("quant_layers", record.details["plan"]))
    if record.details["residual_outputs"]:
        spec = act_spec(cfg).model_dump()
        record.transforms.append(("output_quantizers", {"modules": {
            k: spec for k in record.details["residual_outputs"]}}))
    out = model.copy(module)
    _int8_ops(out, prep.finish(record))
    return out, record


def _int8_ops(model: SlimModel, record: Record) -> None:
    """Which nodes ONNX Runtime runs as integer kernels (recorded; float fallbacks flagged)."""
    import tempfile
    from pathlib import Path

    from slimkit.core.errors import SlimkitError
    from slimkit.export.onnx import export_onnx
    from slimkit.export.qdq import int8_ops

    try:
        with tempfile.TemporaryDirectory() as tmp:
            record.details["ort_int8"] = int8_ops(export_onnx(model, Path(tmp) / "q.onnx"))
    except (SlimkitError, ImportError) as exc:
        record.skipped.append({"what": "ONNX Runtime integer-kernel check", "why": str(exc)})
        return
    for node in record.details["ort_int8"]["float_fallbacks"]:
        record.skipped.append({"what": node, "why": "ONNX Runtime runs it in float between "
                               "DequantizeLinear/QuantizeLinear (slower than float alone)"})
