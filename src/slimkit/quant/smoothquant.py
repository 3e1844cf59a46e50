"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

Transformer activations have a few channels with huge ranges, which ruin per-tensor activation
quantization, while weights are easy. For ``y = X W^T`` and per-input-channel scales ``s``,
``y = (X diag(s)^-1) (W diag(s))^T``. With ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``
(alpha 0.5 splits the difficulty evenly) the activation ranges flatten. ``diag(s)^-1`` is
folded into the preceding LayerNorm's weight and bias, so the float model is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.graph.chains import norm_consumers
from slimkit.quant.calibrate import batches_of, hooked_passes


def channel_absmax(model: nn.Module, names: list[str], data: torch.Tensor,
                   batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Running per-channel (last dim) max |output| of the named modules (bounded memory)."""
    stats: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        def run(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
            amax = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).double()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return run

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    hooked_passes(model, handles, batches_of(data, batch_size))
    return stats


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                  eps: float = 1e-8) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max_k max|W_k[:, j]|^(1 - alpha)`` over all consumers ``k``."""
    w_absmax = torch.stack([w.detach().abs().double().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=eps) ** alpha / w_absmax.clamp(min=eps) ** (1 - alpha)
    return torch.where((act_absmax > eps) & (w_absmax > eps), s, torch.ones_like(s))


def smooth(model: nn.Module, data: torch.Tensor, alpha: float = 0.5,
           batch_size: int = 64) -> list[str]:
    """Apply SmoothQuant to every LayerNorm -> Linear(s) group of ``model``, in place.

    Returns:
        The names of the Linear layers whose inputs were smoothed.

    Example:
        >>> smooth(vit, calib, alpha=0.5)
        ['blocks.0.attn.qkv', 'blocks.0.mlp.fc1', ...]
    """
    groups = {n: c for n, c in (norm_consumers(model) or {}).items()
              if model.get_submodule(n).elementwise_affine}
    stats = channel_absmax(model, list(groups), data, batch_size)
    done = []
    with torch.no_grad():
        for norm_name, linears in groups.items():
            if norm_name not in stats:
                continue  # never reached by the forward pass
            norm = model.get_submodule(norm_name)
            layers = [model.get_submodule(n) for n in linears]
            s = smooth_scales(stats[norm_name], [m.weight for m in layers], alpha)
            norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
            if norm.bias is not None:
                norm.bias.copy_((norm.bias.double() / s).to(norm.bias.dtype))
            for m in layers:
                m.weight.copy_((m.weight.double() * s).to(m.weight.dtype))
            done += linears
    return done
