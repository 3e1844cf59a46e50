"""Fold BatchNorm into the preceding Conv/Linear (before quantization).

In eval mode ``BN(W x + b) = gamma * (W x + b - mu) / sqrt(var + eps) + beta``, so with
``k = gamma / sqrt(var + eps)`` the pair equals one layer with ``W' = k * W`` (per output
channel) and ``b' = k * (b - mu) + beta``. Quantizing ``W'`` (what actually runs) instead of
``W`` is what integer runtimes need, and it removes the BatchNorm from the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ModelError
from slimkit.core.stages import register_rebuilder
from slimkit.graph.chains import bn_analysis
from slimkit.io.model import replace_module


def fold_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer`` in place (computed in float64).

    Raises:
        ModelError: the BatchNorm has no running statistics or its width differs.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(f"cannot fold {type(bn).__name__} without running statistics "
                         "(track_running_stats=False)")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ModelError(f"BatchNorm width {bn.num_features} differs from the layer's {out} "
                         "output channels")
    with torch.no_grad():
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        k = gamma / torch.sqrt(var + bn.eps)
        w = layer.weight.double() * k.view(-1, *[1] * (layer.weight.dim() - 1))
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
        b = k * (b - bn.running_mean.double()) + beta
        layer.weight.copy_(w.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(b.to(layer.bias.dtype))


def fold_batchnorm(model: nn.Module, example: Any = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv/Linear, in place.

    The BatchNorm modules are replaced by ``nn.Identity``. The graph comes from ``torch.fx``,
    or from ``torch.export`` on ``example`` (a batch) for models fx cannot trace (Hugging Face
    ones); models neither can capture are left alone (an empty list is returned; see
    :func:`fold_batchnorms` for the reasons).

    Returns:
        The ``(layer, batchnorm)`` pairs folded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> fold_batchnorm(net)
        [('0', '1')]
    """
    return fold_batchnorms(model, example)[0]


def fold_batchnorms(model: nn.Module, example: Any = None,
                    ) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """:func:`fold_batchnorm`, also returning each BatchNorm left unfolded and why.

    Returns:
        ``(pairs folded, [{"what": batchnorm, "why": reason}])``.
    """
    pairs, skipped = bn_analysis(model, example)
    for layer_name, bn_name in pairs or []:
        fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name))
        replace_module(model, bn_name, nn.Identity())
    return pairs or [], skipped


@register_rebuilder("bn_fold")
def rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: same structure as after folding (bias added, BatchNorm removed)."""
    for layer_name, bn_name in plan["pairs"]:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        replace_module(model, bn_name, nn.Identity())
    return model
