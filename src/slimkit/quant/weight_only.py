"""Weight-only quantization: packed low-bit group-wise weights, round-to-nearest or GPTQ.

:func:`weight_only_quant` (stage kind ``weight_only_quant``) replaces a model's Linear layers
by :class:`~slimkit.quant.packed.PackedLinear` with codes from round-to-nearest
(:func:`~slimkit.quant.primitives.rtn_quantize`) or GPTQ (:mod:`slimkit.quant.gptq`), and
optionally its convs and embedding tables by ``PackedConv`` / ``PackedEmbedding``; it
registers the rebuilder that lets artifacts of zoo models replay the packed structure. The
code format (groups of ``block`` input columns with their own scale and zero point, packed
in the layout of ONNX Runtime's ``MatMulNBits``) is described in :mod:`slimkit.quant.packed`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
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
from slimkit.quant.calibrate import batches_of, check_calibration_inputs
from slimkit.quant.config import WeightOnlyConfig
from slimkit.quant.gptq import collect_hessians, gptq_quantize, output_error
from slimkit.quant.packed import (
    PackedConv,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    packed_nbytes,
)
from slimkit.quant.plan import byte_totals
from slimkit.quant.primitives import (
    bias_dtype,
    block_for,
    dequantize_codes,
    rtn_quantize,
    storage_bits,
)

PLAN_FORMAT = "slimkit-weight-only-plan"
LAYER_TYPES = {"Linear": ("Linear",), "Conv": ("Conv1d", "Conv2d", "Conv3d"),
               "Embedding": ("Embedding",)}


def _shape(layer: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a layer's weight seen as a matrix."""
    w = layer.weight
    return w.shape[0], w[0].numel()


def _entry(name: str, layer: nn.Module, cfg: WeightOnlyConfig) -> dict[str, Any]:
    n, k = _shape(layer)
    bias = getattr(layer, "bias", None) is not None
    block = block_for(k, cfg.group_size)
    linear = isinstance(layer, nn.Linear)
    e: dict[str, Any] = {"type": type(layer).__name__, "in_features": k, "out_features": n,
                         "bias": bias}
    if bias:  # stored as it is: in scale_dtype when that holds every value, else float32
        e["bias_dtype"] = bias_dtype(layer.bias, cfg.scale_dtype)
    if isinstance(layer, nn.modules.conv._ConvNd):
        e["conv"] = PackedConv.spec_of(layer)
    elif isinstance(layer, nn.Embedding):
        e["padding_idx"] = layer.padding_idx
    method = cfg.method if linear else "rtn"
    if method != cfg.method:
        e["method_note"] = f"gptq covers Linear layers; {e['type']} rounded to nearest"
    return {**e, "bits": cfg.bits, "storage_bits": storage_bits(cfg.bits), "block": block,
            "symmetric": cfg.symmetric, "scale_dtype": cfg.scale_dtype, "method": method,
            "granularity": f"group:{block}", "padded_columns": (-k) % block,
            "bytes_before": 4 * (n * k + n * bias),
            "bytes_after": packed_nbytes(k, n, cfg.bits, block, cfg.scale_dtype, bias,
                                         cfg.symmetric, e.get("bias_dtype"))}


def _empty_packed(e: dict[str, Any]) -> PackedWeight:
    """An empty packed layer of the planned type and shape (plans without ``bias_dtype``,
    written before it was recorded, stored the bias in ``scale_dtype``)."""
    args = (e["bits"], e["block"], e["symmetric"], e["scale_dtype"])
    if "conv" in e:
        return PackedConv(e["conv"], *args, e.get("bias_dtype"))
    if e.get("type") == "Embedding":
        return PackedEmbedding(e["out_features"], e["in_features"], e["padding_idx"], *args)
    return PackedLinear(e["in_features"], e["out_features"], *args, e["bias"],
                        e.get("bias_dtype"))


def _quantize_layer(layer: nn.Module, e: dict, cfg: WeightOnlyConfig,
                    hess: Any) -> tuple[PackedWeight, dict[str, Any]]:
    """Codes for one layer (RTN or GPTQ) and its error statistics."""
    w = layer.weight.detach().float().reshape(e["out_features"], -1)
    args = (cfg.bits, e["block"], cfg.symmetric, cfg.scale_dtype)
    stats: dict[str, Any] = {}
    rtn = rtn_quantize(w, *args)
    codes, scales, zeros = rtn
    if e["method"] == "gptq":
        if hess is None:
            stats["fallback"] = "not called on the calibration inputs: rounded to nearest"
        else:
            res = gptq_quantize(w, hess.h, *args, percdamp=cfg.percdamp,
                                blocksize=cfg.gptq_blocksize, act_order=cfg.act_order,
                                damp_tries=cfg.damp_tries)
            codes, scales, zeros = res.codes, res.scales, res.zeros
            stats.update(damp=res.info["damp"], fallback=res.info["fallback"],
                         dead_columns=res.info["dead_columns"])
    w_hat = dequantize_codes(codes, scales, zeros, w.shape[1])
    stats["weight_rel_error"] = float((w_hat - w).norm() / w.norm().clamp(min=1e-12))
    if hess is not None:
        stats["output_rel_error"] = output_error(w, w_hat, hess.h)
        if e["method"] == "gptq":
            w_rtn = dequantize_codes(*rtn, w.shape[1])
            stats["output_rel_error_rtn"] = output_error(w, w_rtn, hess.h)
    packed = _empty_packed(e).load_codes(codes, scales, zeros, getattr(layer, "bias", None))
    return packed, stats


def _calibration(cfg: WeightOnlyConfig, data: DataBundle | None, calib_x: Any) -> Any:
    if calib_x is None and data is not None:
        calib_x = calibration_subset(data, cfg.calib_samples, cfg.seed)
    if calib_x is None:
        if cfg.method == "gptq":
            raise ConfigError("weight_only_quant: method 'gptq' needs calibration data "
                              "(give --data, or calib_x)")
        return None
    return check_calibration_inputs(calib_x, "weight_only_quant")


def _select(model: nn.Module, cfg: WeightOnlyConfig) -> tuple[dict[str, nn.Module], list]:
    types = [t for kind in cfg.layer_types for t in LAYER_TYPES[kind]]
    chosen, skipped = select_layers(model, types, cfg.include, cfg.exclude)
    for name, mod in list(chosen.items()):
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            del chosen[name]
            skipped.append({"what": name, "why": f"padding_mode '{mod.padding_mode}': packed "
                            "convs support zero padding only; left float"})
    left = {t for kind, ts in LAYER_TYPES.items() if kind not in cfg.layer_types for t in ts}
    for name, mod in model.named_modules():
        if type(mod).__name__ in left:
            skipped.append({"what": name, "why": f"{type(mod).__name__}: not in layer_types "
                            f"{cfg.layer_types}; left float"})
    if not chosen:
        raise ConfigError(f"weight_only_quant: the model has no {'/'.join(cfg.layer_types)} "
                          f"layer to quantize (after include={cfg.include}, "
                          f"exclude={cfg.exclude})")
    return chosen, skipped


def _weight_only_quant(model: nn.Module, cfg: WeightOnlyConfig, data: DataBundle | None = None,
                       example_inputs: Sequence[torch.Tensor] | None = None,
                       calib_x: Any = None) -> tuple[nn.Module, Record]:
    """Replace a copy's Linear / Conv / Embedding layers by packed ones (``model`` untouched).

    Args:
        model: any module with layers of ``cfg.layer_types``.
        cfg: the weight-only config.
        data: calibration data (``cfg.calib_samples`` stratified training samples); needed by
            GPTQ, optional for RTN (then used to report each layer's output error).
        example_inputs: inputs for the verification forward pass when no data is given.
        calib_x: calibration inputs given directly (instead of ``data``): a tensor, tuple or
            dict batch.

    Returns:
        The quantized copy and a Record: per layer bits, scheme, group size, padding, bytes
        before/after, weight and output errors (GPTQ: also RTN's, for comparison), fallbacks;
        skipped layers with the reason; ``details["plan"]`` rebuilds the structure.

    Raises:
        ConfigError: no layer selected, bad selectors, GPTQ without data.
        DataError: calibration inputs empty, constant or non-finite.
        ModelError: the quantized model produces NaN/Inf.

    Example:
        >>> small, rec = weight_only_quant(net, WeightOnlyConfig(bits=4, method="gptq"), data)
        >>> rec.details["totals"]["ratio"]
    """
    work = copy.deepcopy(model)
    chosen, skipped = _select(work, cfg)
    calib = _calibration(cfg, data, calib_x)
    hess = {}
    linears = [n for n, m in chosen.items() if isinstance(m, nn.Linear)]
    if calib is not None and linears:
        hess = collect_hessians(work, linears, batches_of(calib, cfg.calib_batch))
    plan = {"format": PLAN_FORMAT, "version": 1, "layers": {}}
    shared = shared_weights(work)
    for name, layer in chosen.items():
        e = _entry(name, layer, cfg)
        if name in shared:
            # The other holders keep the float matrix: only the bias bytes are freed.
            e["shared_with"] = shared[name]
            e["bytes_before"] = 4 * e["out_features"] * e["bias"]
        elif e["bytes_after"] >= e["bytes_before"]:
            skipped.append({"what": name, "why": f"packed form ({e['bytes_after']} B) would not "
                            f"be smaller than float ({e['bytes_before']} B): rows of "
                            f"{e['in_features']} pad to a block of {e['block']}"})
            continue
        packed, stats = _quantize_layer(layer, e, cfg, hess.get(name))
        replace_module(work, name, packed)
        plan["layers"][name] = {**e, **stats,
                                "calibration_samples": None if calib is None else B.size(calib)}
    example = (B.take(calib, slice(0, 2)),) if calib is not None else example_inputs
    verify_finite(work, example, "weight_only_quant")
    set_mode(work, model.training)
    return work, _record(plan, skipped)


def _record(plan: dict, skipped: list[dict]) -> Record:
    layers = plan["layers"]
    record = Record(skipped=skipped, details={"plan": plan, "layers": layers})
    for name, e in layers.items():
        scheme = "sym" if e["symmetric"] else "asym"
        pad = f", last group padded by {e['padded_columns']}" if e["padded_columns"] else ""
        err = (f", output error {e['output_rel_error']:.4f}" if "output_rel_error" in e
               else f", weight error {e['weight_rel_error']:.4f}")
        fb = "".join(f" [{e[k]}]" for k in ("fallback", "method_note") if e.get(k))
        if e.get("shared_with"):
            fb += f" [weight shared with {', '.join(e['shared_with'])}: its float matrix stays]"
        record.changed.append(f"{name}: int{e['bits']} {scheme} group {e['block']} "
                              f"{e['method']}{pad}, {e['bytes_before']} -> {e['bytes_after']} B"
                              f"{err}{fb}")
    record.details["totals"] = byte_totals(layers)
    return record


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Put an empty packed layer of the planned type and shape at every planned layer.

    Raises:
        ConfigError: not a weight-only plan, or a layer missing / of another type or shape.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not a weight-only quantization plan (format {plan.get('format')!r})")
    modules = dict(model.named_modules())
    for name, e in plan["layers"].items():
        layer, kind = modules.get(name), e.get("type", "Linear")
        if type(layer).__name__ != kind:
            raise ConfigError(f"weight-only plan: layer '{name}' is not a {kind} of the model."
                              f"{did_you_mean(name, modules)}")
        if _shape(layer) != (e["out_features"], e["in_features"]):
            raise ConfigError(f"weight-only plan: layer '{name}' has a {_shape(layer)} weight "
                              f"matrix, the plan expects {(e['out_features'], e['in_features'])}")
        replace_module(model, name, _empty_packed(e))
    return list(plan["layers"])


@register_rebuilder("weight_only_quant")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the packed layers of ``plan``."""
    apply_plan(model, plan)
    return model


@register_stage(WeightOnlyConfig)
def weight_only_quant(model: SlimModel, cfg: WeightOnlyConfig,
                      ctx: StageContext) -> tuple[SlimModel, Record]:
    """Replace a copy's Linear/Conv/Embedding layers by packed ones (see
    :func:`_weight_only_quant`).

    Hugging Face Conv1D layers (GPT-2) count as Linear: they are converted first (same
    math, recorded). A layer whose weight another module also holds (a tied LM head) is left
    float, since its float matrix would stay; naming it in ``include`` packs it anyway, its
    bytes counted honestly (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "weight_only_quant",
                                      convert="Linear" in cfg.layer_types)
    module, record = _weight_only_quant(model.module, cfg, ctx.data,
                                        example_inputs=model.example_inputs(2))
    if record.details["layers"]:
        # layers became packed ones: the artifact rebuilds them by replaying the plan.
        record.transforms.append(("weight_only_quant", record.details["plan"]))
    return model.copy(module), prep.finish(record)
