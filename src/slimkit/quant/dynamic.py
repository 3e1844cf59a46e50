"""Dynamic INT8 quantization: int8 per-channel weights, activations quantized at run time.

Each selected Linear becomes a :class:`DynamicQuantLinear`: its weight is stored as int8 codes
``W_q`` in ``[-127, 127]`` with one float scale per output channel; at every call the input
is quantized to uint8 with a scale and zero point computed from its own range, either one for
the whole tensor (``activations="tensor"``, ONNX's DynamicQuantizeLinear) or one per row /
token (``activations="token"``, much closer for transformers, whose tokens differ in range).
The product is computed in integers and rescaled::

    y = (x_q - z_x) @ W_q^T * (s_x * s_w) + b

The PyTorch forward computes exactly what ONNX Runtime computes (same rounding, exact integer
accumulation), and the ONNX export runs in integers: ``DynamicQuantizeLinear`` (per tensor) or
a few elementwise ops (per row), ``MatMulInteger`` and a float rescale. Both operands of
``MatMulInteger`` are uint8 (the weight shifted by 128 with a zero point of 128): on CPUs
without VNNI, ONNX Runtime's u8 x s8 kernel saturates 16-bit intermediate sums (that is why
its own quantizer offers ``reduce_range``), while u8 x u8 is exact and only slightly slower.
``reduce_range=True`` keeps 7-bit weight codes ([-63, 63], per channel) and exports int8
weights, so ONNX Runtime runs its faster u8 x s8 kernel without saturating. Per tensor, the
exported chain (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add) is the pattern
ONNX Runtime fuses into one ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` kernel.

Layers can be kept float: by selector (``exclude``), the ``keep_worst`` layers with the largest
relative output error on calibration data, or every layer above ``max_layer_error``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_rebuilder, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.select import select_layers
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure import verify_finite
from slimkit.quant.calibrate import hooked_passes
from slimkit.quant.plan import replace_module
from slimkit.quant.weight_only import OTHER_TYPES, byte_totals, check_calibration

PLAN_FORMAT = "slimkit-dynamic-quant-plan"
ACTIVATIONS = ("token", "tensor")


def activation_qparams(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of ``x`` ``(..., K)``, as ONNX's DynamicQuantizeLinear.

    The range is widened to hold 0; ``scale = (max - min) / 255`` (1 for an all-zero range,
    as ONNX Runtime does) and ``zero = round(-min / scale)``.

    Returns:
        ``(scale, zero)`` float tensors shaped ``(..., 1)`` (per row) or ``()``.
    """
    if per_row:
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    else:
        lo, hi = x.amin().clamp(max=0.0), x.amax().clamp(min=0.0)
    span = hi - lo
    scale = torch.where(span > 0, span / 255.0, 1.0)  # (a scalar: no shape baked in ONNX)
    zero = torch.clamp(torch.round(-lo / scale), 0.0, 255.0)
    return scale, zero


class _DynamicQuantizeLinear(torch.autograd.Function):
    """Export hook: per-tensor activation quantization as one ``DynamicQuantizeLinear``."""

    @staticmethod
    def forward(ctx, x, q, scale, zero):  # noqa: ANN001, ANN205
        return q.clone(), scale.clone(), zero.clone()

    @staticmethod
    def symbolic(g, x, q, scale, zero):  # noqa: ANN001, ANN205
        q, s, z = g.op("DynamicQuantizeLinear", x, outputs=3)
        sizes = x.type().varyingSizes()
        q.setType(x.type().with_dtype(torch.uint8).with_sizes(
            [None] * (len(sizes) - 1) + [sizes[-1]]))
        return q, s, z


class _MatMulInteger(torch.autograd.Function):
    """Export hook: ``(q - z) @ (W_q + 128 - 128)^T`` as ``MatMulInteger`` (u8 x u8 -> int32).

    ``z`` is the per-tensor input zero point (None: 0, the per-row path corrects afterwards).
    """

    @staticmethod
    def forward(ctx, q, w_u8_t, a_zero, w_zero, result):  # noqa: ANN001, ANN205
        return result.clone()  # computed by the caller (exact); the export emits the real op

    @staticmethod
    def symbolic(g, q, w_u8_t, a_zero, w_zero, result):  # noqa: ANN001, ANN205
        if a_zero is None:
            a_zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
        inputs = [q, w_u8_t, a_zero] + ([] if w_zero is None else [w_zero])
        out = g.op("MatMulInteger", *inputs)
        sizes = q.type().varyingSizes() if hasattr(q.type(), "varyingSizes") else None
        if sizes:  # rank and last dim only: a traced batch size must not be baked in
            out.setType(q.type().with_dtype(torch.int32).with_sizes(
                [None] * (len(sizes) - 1) + [w_u8_t.type().varyingSizes()[1]]))
        return out


class DynamicQuantLinear(nn.Module):
    """A Linear with int8 per-channel weights and uint8 activations quantized at run time.

    Buffers: ``weight_q`` (int8 ``[N, K]``, codes in [-127, 127]), ``weight_scale`` (float32
    ``[N]``), ``weight_rowsum`` (int32 ``[N]``, sums of the codes); ``bias`` (float, optional).

    Args:
        in_features, out_features: as in ``nn.Linear``.
        activations: ``token`` (one scale per row of the flattened input) or ``tensor``.
        bias: whether the layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, activations: str = "token",
                 bias: bool = True, reduce_range: bool = False) -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations '{activations}' is not one of {ACTIVATIONS}")
        self.in_features, self.out_features, self.activations = (in_features, out_features,
                                                                 activations)
        self.reduce_range = reduce_range
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        # row sums of W_q: the zero-point correction z_x * sum_k W_q[n, k] (int32, N values)
        self.register_buffer("weight_rowsum", torch.zeros(out_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, activations: str = "token",
                    reduce_range: bool = False) -> DynamicQuantLinear:
        """Quantize ``layer``'s weight per output channel, symmetric, to [-127, 127]
        ([-63, 63] with ``reduce_range``)."""
        new = cls(layer.in_features, layer.out_features, activations, layer.bias is not None,
                  reduce_range)
        w = layer.weight.detach().float()
        top = 63 if reduce_range else 127
        scale = (w.abs().amax(dim=1) / top).clamp(min=1e-12)
        new.weight_q.copy_(torch.clamp(torch.round(w / scale[:, None]), -top, top))
        new.weight_scale.copy_(scale)
        new.weight_rowsum.copy_(new.weight_q.to(torch.int32).sum(dim=1))
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach().float())
        return new

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{bits} weights per channel, uint8 activations per {self.activations}")

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (for comparisons; the forward does not use it)."""
        return self.weight_q.float() * self.weight_scale[:, None]

    def _quantize_input(self, x: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = activation_qparams(x, self.activations == "token")
        q = torch.clamp(torch.round(x / scale) + zero, 0.0, 255.0)
        if torch.onnx.is_in_onnx_export() and self.activations == "tensor":
            return _DynamicQuantizeLinear.apply(x, q.to(torch.uint8), scale,
                                                zero.to(torch.uint8))
        return q, scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no reshapes: every op broadcasts over the leading dims (MatMulInteger too)
        q, scale, zero = self._quantize_input(x)
        per_row = self.activations == "token"
        # exact integer products (float64 holds every partial sum exactly); per tensor, the
        # zero point goes into MatMulInteger (ONNX Runtime then fuses the chain into one
        # DynamicQuantizeMatMul); per row it cannot, so z * sum_k W_q is subtracted after
        centered = q.double() if per_row else q.double() - zero.double()
        acc = (centered @ self.weight_q.double().T).to(torch.int32)
        if torch.onnx.is_in_onnx_export():
            if self.reduce_range:  # 7-bit codes: the u8 x s8 kernel cannot saturate
                w_t, w_zero = self.weight_q.T, None
            else:
                w_t = (self.weight_q.to(torch.int32) + 128).to(torch.uint8).T
                w_zero = torch.full((self.out_features,), 128, dtype=torch.uint8)
            acc = _MatMulInteger.apply(q.to(torch.uint8), w_t, None if per_row else zero,
                                       w_zero, acc)
        if per_row:
            acc = acc - zero.to(torch.int32) * self.weight_rowsum  # (q - z) @ W_q^T, exact
        y = acc.to(torch.float32) * (scale * self.weight_scale)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- the technique


class DynamicQuantConfig(SlimConfig):
    """Dynamic INT8: int8 per-channel weights, activations quantized at run time per row or
    per tensor; sensitive layers can stay float.

    Example:
        >>> DynamicQuantConfig(activations="token", exclude=["head"], keep_worst=1)
    """

    kind: Literal["dynamic_quant"] = "dynamic_quant"
    version: Literal[1] = Field(1, description="Config schema version.")
    activations: Literal["token", "tensor"] = Field(
        "token", description="Activation scale per row/token of the flattened input (token: "
        "closest to float, but its per-row quantization is ~20 elementwise ONNX ops per layer, "
        "so in ONNX Runtime it can be slower than FP32 on small models) or one per tensor "
        "(tensor: ONNX DynamicQuantizeLinear, fused by ONNX Runtime into one kernel; the fast "
        "choice, with reduce_range on CPUs without VNNI).")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Keep these layers float (name, re:REGEX, type:).")
    keep_worst: int = Field(0, ge=0, description="Keep float the layers with the largest "
                            "relative output error on calibration data (needs data).")
    max_layer_error: float | None = Field(
        None, gt=0.0, description="Keep float every layer whose relative output error "
        "||y_q - y|| / ||y|| on calibration data exceeds this (needs data).")
    reduce_range: bool = Field(
        False, description="7-bit weight codes [-63, 63] (still int8): ONNX Runtime then uses "
        "its faster u8 x s8 kernel, which on CPUs without VNNI saturates with full-range int8 "
        "weights; without it the export runs exact u8 x u8 products.")
    calib_samples: int = Field(64, ge=1, description="Training samples used to measure the "
                               "layers' output errors.")
    calib_batch: int = Field(16, ge=1, description="Batch size of the calibration pass.")
    seed: int = Field(0, description="Seed of the calibration subset.")


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
        check_calibration(calib_x, "dynamic_quant")
        batches = [(calib_x[i:i + cfg.calib_batch],)
                   for i in range(0, len(calib_x), cfg.calib_batch)]
        errors = layer_errors(work, chosen, cfg.activations, batches, cfg.reduce_range)
    keep = _keep_float(errors, cfg)
    plan: dict[str, Any] = {"format": PLAN_FORMAT, "version": 1, "layers": {}}
    for name, layer in chosen.items():
        if name in keep:
            skipped.append({"what": name, "why": keep[name]})
            continue
        replace_module(work, name, DynamicQuantLinear.from_linear(layer, cfg.activations,
                                                                  cfg.reduce_range))
        k, n, b = layer.in_features, layer.out_features, layer.bias is not None
        plan["layers"][name] = {
            "in_features": k, "out_features": n, "bias": b, "activations": cfg.activations,
            "reduce_range": cfg.reduce_range,
            "weights": f"int{7 if cfg.reduce_range else 8} symmetric per channel",
            "bytes_before": 4 * (n * k + n * b),
            "bytes_after": n * k + 8 * n + 4 * n * b, "output_rel_error": errors.get(name)}
    verify_finite(work, (calib_x[:2],) if calib_x is not None else example_inputs,
                 "dynamic_quant")
    set_mode(work, model.training)
    return work, _record(plan, skipped)


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
    """
    module, record = _dynamic_quant(model.module, cfg, ctx.data,
                                    example_inputs=model.example_inputs(2))
    if record.details["layers"]:
        record.transforms.append(("dynamic_quant", record.details["plan"]))
    return model.copy(module), record
