"""``DynamicQuantLinear``: int8 per-channel weights, uint8 activations quantized at run time,
and its ONNX export functions.

The weight is stored as int8 codes ``W_q`` in ``[-127, 127]`` with one float scale per output
channel; at every call the input is quantized to uint8 with a scale and zero point computed
from its own range, either one for the whole tensor (``activations="tensor"``, ONNX's
DynamicQuantizeLinear) or one per row / token (``activations="token"``). The product is
computed in integers and rescaled::

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

The technique that builds these layers is :mod:`slimkit.quant.dynamic`.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.quant.primitives import activation_qparams

ACTIVATIONS = ("token", "tensor")


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
