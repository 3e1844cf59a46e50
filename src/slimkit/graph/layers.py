"""Layers that map input channels to output channels, and where their weights keep each side.

``nn.Linear`` and ``nn.ConvNd`` hold their weight as ``[out, in, ...]``. Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ImageGPT...) is a Linear whose weight is
transposed, ``[in, out]``, with its sizes in ``nx`` (in) and ``nf`` (out) and a forward
``addmm(bias, x, weight)`` that reads ``nf``. The dependency analysis (which layer roots a
group), the slicer (which size attributes to refresh) and the config sync (which layers had
the FFN width) all need to know which dim is which; this is their one home.

transformers is never imported here: a ``Conv1D`` can only exist once transformers has been
imported, so it is looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys

from torch import nn

#: Layers whose weight is ``[out, in, ...]``.
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def hf_conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded, else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (a Linear with weight ``[in, out]``)."""
    cls = hf_conv1d_type()
    return cls is not None and isinstance(module, cls)


def out_dim(module: nn.Module | None) -> int | None:
    """The weight dim holding a layer's output channels: 0 (Conv, Linear), 1 (HF ``Conv1D``),
    or None for any other module."""
    if isinstance(module, PRODUCERS):
        return 0
    return 1 if is_hf_conv1d(module) else None


def linear_features(module: nn.Module | None) -> tuple[int, int] | None:
    """``(in, out)`` features of an ``nn.Linear`` or an HF ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


__all__ = ["PRODUCERS", "hf_conv1d_type", "is_hf_conv1d", "linear_features", "out_dim"]
