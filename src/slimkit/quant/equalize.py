"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019).

For ``y = W2 relu(W1 x + b1)`` and any positive diagonal ``S``, ``relu(S^-1 z) = S^-1 relu(z)``,
so ``W1 <- S^-1 W1``, ``b1 <- S^-1 b1``, ``W2 <- W2 S`` computes the same function. Choosing
``s_i = sqrt(r1_i / r2_i)``, with ``r1_i`` the range of output channel ``i`` of ``W1`` and
``r2_i`` the range of input channel ``i`` of ``W2``, makes both ranges ``sqrt(r1_i r2_i)``:
per-tensor (and better-conditioned per-channel) weight quantization then loses less.
Max pooling also commutes with positive per-channel scales, so it may sit between the two.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.graph.chains import output_links

#: Modules that commute with a positive per-channel scale and keep the channel axis.
_SCALE_EQUIVARIANT = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity,
                      nn.Dropout)


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(first, second)`` layer pairs joined only by scale-equivariant modules."""
    layers = {n for n, m in model.named_modules()
              if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    links = output_links(model, layers) or {}
    modules = dict(model.named_modules())
    out = []
    for name, link in links.items():
        second = link["consumer"]
        if second is None or not all(isinstance(modules.get(t), _SCALE_EQUIVARIANT)
                                     for t in link["through"]):
            continue
        a, b = modules[name], modules[second]
        if type(a) is not type(b) or getattr(a, "groups", 1) != 1 or getattr(b, "groups", 1) != 1:
            continue
        if b.weight.shape[1] == a.weight.shape[0]:
            out.append((name, second))
    return out


def equalize_pair(first: nn.Module, second: nn.Module, eps: float = 1e-12) -> torch.Tensor:
    """Equalize one pair in place (computed in float64).

    Returns:
        The scales ``s`` (``W1 <- W1 / s``, ``W2 <- W2 * s``).
    """
    with torch.no_grad():
        w1, w2 = first.weight.double(), second.weight.double()
        r1 = w1.abs().flatten(1).amax(1)
        r2 = w2.abs().transpose(0, 1).flatten(1).amax(1)
        s = torch.where((r1 > eps) & (r2 > eps), torch.sqrt(r1 / r2.clamp(min=eps)),
                        torch.ones_like(r1))
        shape1 = [-1] + [1] * (w1.dim() - 1)
        shape2 = [1, -1] + [1] * (w2.dim() - 2)
        first.weight.copy_((w1 / s.view(shape1)).to(first.weight.dtype))
        if first.bias is not None:
            first.bias.copy_((first.bias.double() / s).to(first.bias.dtype))
        second.weight.copy_((w2 * s.view(shape2)).to(second.weight.dtype))
    return s


def equalize(model: nn.Module, iterations: int = 3) -> list[tuple[str, str]]:
    """Equalize every conv->(relu/maxpool)->conv and linear->relu->linear pair, in place.

    Chains (a -> b -> c) share layer b, so the pass is repeated ``iterations`` times (the
    paper iterates to convergence).

    Returns:
        The pairs equalized (empty when the model cannot be traced).

    Example:
        >>> equalize(net)
        [('features.0', 'features.2')]
    """
    pairs = _pairs(model)
    for _ in range(iterations):
        for a, b in pairs:
            equalize_pair(model.get_submodule(a), model.get_submodule(b))
    return pairs
