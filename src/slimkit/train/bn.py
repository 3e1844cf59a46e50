"""Re-estimating BatchNorm statistics after a model's structure changed (adaptive BN)."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.io import batch as B
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
        How many BatchNorm layers were re-estimated (0: the model has none). Layers the
        inputs never reach keep their statistics, and so does every layer if a forward
        pass fails.

    Raises:
        ConfigError: ``batch_size`` below 1.
        DataError: fewer than two samples (a batch of one has no variance; a
            ``batch_size`` of 1 is raised to 2 for the same reason).

    Example:
        >>> recalibrate_batchnorm(pruned, (calibration_subset(data, 256),))  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ConfigError(f"recalibrate_batchnorm: batch_size must be at least 1, got "
                          f"{batch_size}")
    n = B.size(inputs) if B.leaves(inputs) else 0
    if n < 2:
        raise DataError(f"recalibrate_batchnorm needs at least 2 samples to estimate a "
                        f"variance, got {n}; pass more calibration inputs")
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    bs = max(batch_size, 2)  # one sample has no batch variance (BatchNorm1d refuses it)
    starts = range(0, max(n - bs + 1, 1), bs)  # full batches (or the one)
    saved = [(m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
             for m in bns]
    with modes_kept(model), torch.no_grad():
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        ok = False
        try:
            for s in starts:
                B.call(model, B.take(inputs, slice(s, s + bs)))
            ok = True
        finally:
            reached = 0
            for m, (momentum, buffers) in zip(bns, saved, strict=True):
                m.momentum = momentum
                if ok and int(m.num_batches_tracked) > 0:
                    reached += 1
                else:  # a failed pass, or a layer the inputs never reach: as it was
                    for k, b in buffers.items():
                        getattr(m, k).copy_(b)
    return reached


__all__ = ["recalibrate_batchnorm"]
