"""Quantization modules: a fake quantizer and a quantized Linear/Conv wrapper.

``FakeQuant`` simulates ``dequantize(quantize(x))`` with fixed qparams held in buffers. For
``tensor`` and ``channel`` granularity it runs ``torch.fake_quantize_per_*_affine``: the same
half-to-even rounding as ONNX Runtime, a straight-through gradient (zero outside the range) for
QAT, and an ONNX export to a QuantizeLinear/DequantizeLinear pair carrying slimkit's own scales.

``QuantLayer`` wraps a Linear or Conv: optional quantizers on its input, weight and output.
``freeze()`` replaces the float weight by its integer codes (int8 buffer) plus qparams, so the
saved state really holds integers; the forward then dequantizes them. :func:`snap_bias` puts
its bias on the int32 grid the integer kernels use (PTQ, QAT and mixed precision share it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.quant.primitives import (
    Granularity,
    choose_qparams,
    dequantize,
    qrange,
    quantize,
    reduce_range,
)

QUANTIZABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")
OTHER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Embedding")  # what Linear-only techniques skip
#: Hyperparameters of the wrapped layer that model code reads from the module it calls (e.g.
#: Hugging Face MobileNetV2's TF "SAME" padding reads ``conv.stride``, ``kernel_size`` and
#: ``dilation`` at run time): a wrapper answers them from its layer, read-only.
LAYER_ATTRS = frozenset({"in_channels", "out_channels", "kernel_size", "stride", "padding",
                         "dilation", "groups", "padding_mode", "output_padding", "transposed",
                         "in_features", "out_features"})


class LayerAttrs:
    """Mixin for a module wrapping ``self.layer``: :data:`LAYER_ATTRS` read through to it."""

    def __getattr__(self, name: str):  # noqa: ANN204 - nn.Module's own signature
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name not in LAYER_ATTRS:
                raise
            layer = self._modules.get("layer")  # type: ignore[attr-defined]
            if layer is None or not hasattr(layer, name):
                raise
            return getattr(layer, name)


class FakeQuant(nn.Module):
    """``dequantize(quantize(x))`` with qparams in buffers (set them before use).

    Args:
        bits: code width, 2..8.
        symmetric: zero point in the middle of the range (0 when signed).
        signed: int codes (else uint).
        granularity: ``tensor``, ``channel[:AXIS]`` or ``group:SIZE[:AXIS]``.
        narrow: drop the most negative code (symmetric weights: [-127, 127]).
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True,
                 granularity: str | Granularity = "tensor", narrow: bool = False) -> None:
        super().__init__()
        self.bits, self.symmetric, self.signed, self.narrow = bits, symmetric, signed, narrow
        self.granularity = Granularity.parse(granularity)
        self.qmin, self.qmax = qrange(bits, signed, narrow)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"{'int' if self.signed else 'uint'}{self.bits} {kind} {self.granularity}"

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Set qparams from a range, shaped as :func:`reduce_range` returns it."""
        scale, zero = choose_qparams(min_val, max_val, self.bits, self.symmetric, self.signed,
                                     self.narrow)
        if self.granularity.kind == "tensor":
            scale, zero = scale.reshape(()), zero.reshape(())
        self.scale, self.zero_point = scale.to(self.scale.device), zero.to(self.scale.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # qparam shapes depend on the tensor they were calibrated on: take the saved shapes.
        for name in ("scale", "zero_point"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Set qparams from ``x``'s own min/max (weights)."""
        self.set_range(*reduce_range(x, self.granularity))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.scale, self.zero_point, self.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.granularity
        if torch.compiler.is_exporting():
            # torch.export has no fake-tensor kernel for the fused fake-quant ops (artifact .pt2
            # graphs): trace the pure primitives, which compute the same values.
            return self.dequantize(self.quantize(x))
        if g.kind == "tensor":
            return torch.fake_quantize_per_tensor_affine(
                x, self.scale, self.zero_point, self.qmin, self.qmax)
        if g.kind == "channel":
            return torch.fake_quantize_per_channel_affine(
                x, self.scale.flatten(), self.zero_point.flatten(), g.axis % x.dim(),
                self.qmin, self.qmax)
        # group: straight-through estimator around the pure primitives
        return x + (self.dequantize(self.quantize(x)) - x).detach()


class QuantLayer(LayerAttrs, nn.Module):
    """A Linear/Conv whose input, weight and output may each pass through a ``FakeQuant``.

    After :meth:`freeze` the weight is stored as integer codes (``weight_q``) and the float
    ``layer.weight`` is gone from the state dict. The layer's hyperparameters (``stride``,
    ``kernel_size``, ``in_features``...; :data:`LAYER_ATTRS`) read through to it, as model
    code that inspects the module it calls expects.
    """

    def __init__(self, layer: nn.Module, weight: FakeQuant | None = None,
                 input: FakeQuant | None = None, output: FakeQuant | None = None) -> None:
        super().__init__()
        if type(layer).__name__ not in QUANTIZABLE:
            raise ConfigError(f"QuantLayer wraps {', '.join(QUANTIZABLE)}, not "
                              f"{type(layer).__name__}")
        self.layer = layer
        self.weight_fq, self.input_fq, self.output_fq = weight, input, output
        self.frozen = False

    def weight(self) -> torch.Tensor:
        """The weight the layer computes with (dequantized when frozen, else fake-quantized)."""
        if self.frozen:
            return self.weight_fq.dequantize(self.weight_q)
        w = self.layer.weight
        return w if self.weight_fq is None else self.weight_fq(w)

    def freeze(self) -> None:
        """Store the weight as integer codes (real compression); idempotent."""
        if self.frozen or self.weight_fq is None:
            return
        codes = self.weight_fq.quantize(self.layer.weight.detach())
        del self.layer.weight
        self.layer.register_buffer("weight", None)
        self.register_buffer("weight_q", codes)
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fq is not None:
            x = self.input_fq(x)
        w = self.weight()
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        return y if self.output_fq is None else self.output_fq(y)


def snap_bias(ql: QuantLayer) -> bool:
    """Round the bias to the int32 grid ``s_x * s_w`` that integer kernels accumulate on.

    Returns:
        True when some bias value had to be clipped to the int32 range (a tiny input scale,
        e.g. from constant calibration data).
    """
    if ql.layer.bias is None or ql.input_fq is None or ql.weight_fq is None:
        return False
    if ql.input_fq.granularity.kind != "tensor" or ql.weight_fq.granularity.kind == "group":
        return False
    with torch.no_grad():
        step = (ql.input_fq.scale.double() * ql.weight_fq.scale.double().flatten())
        step = step.expand_as(ql.layer.bias)
        q = torch.round(ql.layer.bias.double() / step)
        clipped = bool((q.abs() > 2**31 - 1).any())
        q = q.clamp(-(2**31), 2**31 - 1)
        ql.layer.bias.copy_((q * step).to(ql.layer.bias.dtype))
    return clipped
