"""Empirical bias correction (Nagel et al. 2019, section 4.2).

Weight rounding shifts each output channel's mean: ``E[W_q x] - E[W x] = (W_q - W) E[x]`` for
a linear map. Measured on calibration data (with the layer's own quantized input, so the
shift caused by upstream quantization is included), the shift is subtracted from the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.quant.calibrate import batches_of, hooked_passes
from slimkit.quant.modules import QuantLayer


def _error(ql: QuantLayer, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum of ``f(x; W_q) - f(x; W)`` (no bias) and how many were summed."""
    if ql.input_fq is not None:
        x = ql.input_fq(x)
    dw = ql.weight() - ql.layer.weight
    if isinstance(ql.layer, nn.Linear):
        y = F.linear(x, dw).double().reshape(-1, dw.shape[0])
    else:
        y = ql.layer._conv_forward(x, dw, None).double().transpose(0, 1).flatten(1).T
    return y.sum(0), y.shape[0]


def correct_biases(model: nn.Module, layers: dict[str, QuantLayer], data: torch.Tensor,
                   batch_size: int = 64) -> dict[str, float]:
    """Subtract each layer's mean output shift caused by weight quantization, in place.

    Call before ``freeze`` (the float weight is needed). Layers without a bias are left alone.

    Returns:
        ``{layer: largest |correction|}`` for the layers corrected.

    Example:
        >>> correct_biases(model, wrap_layers(model, plan), calib)  # doctest: +SKIP
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, ql in layers.items():
        if ql.layer.bias is None or ql.weight_fq is None or ql.frozen:
            continue

        def hook(_m: nn.Module, args: tuple, name: str = name, ql: QuantLayer = ql) -> None:
            err, n = _error(ql, args[0].detach())
            sums[name] = sums.get(name, 0) + err
            counts[name] = counts.get(name, 0) + n

        handles.append(ql.register_forward_pre_hook(hook))
    hooked_passes(model, handles, batches_of(data, batch_size))
    out = {}
    with torch.no_grad():
        for name, total in sums.items():
            shift = total / counts[name]
            bias = layers[name].layer.bias
            bias.copy_((bias.double() - shift).to(bias.dtype))
            out[name] = float(shift.abs().max())
    return out
