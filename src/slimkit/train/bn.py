"""Re-estimating BatchNorm statistics after a model's structure changed (adaptive BN)."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.io.model import modes_kept


def recalibrate_batchnorm(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                          batch_size: int = 32) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``inputs``, in place.

    Pruning changes the activations a BatchNorm sees, but not the statistics it stored, so a
    pruned model evaluated as is mostly shows that mismatch: candidates that fine-tuning
    would recover equally well look equally broken. With the statistics re-estimated on a
    few batches of training data (no gradient, weights untouched), a candidate's output
    tells how much of the model survived (Li et al., "EagleEye", ECCV 2020).

    The statistics are the equal-weight average over the full batches of ``inputs``
    (PyTorch's cumulative average, ``momentum=None``); a smaller last batch is left out
    unless it is the only one. Other layers run in eval mode (no dropout); training flags
    and momenta are restored.

    Args:
        model: the model to update (in place).
        inputs: forward arguments, each batched along dimension 0.
        batch_size: samples per forward pass.

    Returns:
        How many BatchNorm layers were re-estimated (0: the model has none).

    Example:
        >>> recalibrate_batchnorm(pruned, (calibration_subset(data, 256),))  # doctest: +SKIP
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    n = len(inputs[0])
    starts = range(0, max(n - batch_size + 1, 1), batch_size)  # full batches (or the one)
    momenta = [m.momentum for m in bns]
    with modes_kept(model), torch.no_grad():
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for s in starts:
                model(*(t[s:s + batch_size] for t in inputs))
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
    return len(bns)


__all__ = ["recalibrate_batchnorm"]
