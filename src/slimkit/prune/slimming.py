"""Network Slimming (Liu et al. 2017): sparsity-regularized training of normalization scales.

Training with an L1 penalty on every BatchNorm (and GroupNorm/LayerNorm) scale ``gamma`` drives
the scales of unimportant channels towards zero, so the ``bn_scale`` criterion afterwards
separates the channels to remove from those to keep much more sharply. The penalty is an
:class:`~slimkit.train.objective.Objective`, so the one training loop runs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.prune.config import SlimmingConfig
from slimkit.train import fit
from slimkit.train.objective import Objective

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


class NormScaleL1(Objective):
    """Cross-entropy (on the judged output) plus ``penalty * sum(|gamma|)`` over the model's
    normalization scales."""

    def __init__(self, penalty: float) -> None:
        super().__init__()
        self.penalty = penalty

    def forward(self, model: nn.Module, x: B.Inputs, y: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = B.select(B.call(model, x))
        ce = nn.functional.cross_entropy(logits, y)
        l1 = sum(m.weight.abs().sum() for m in model.modules()
                 if isinstance(m, NORMS) and getattr(m, "weight", None) is not None)
        loss = ce + self.penalty * l1
        return loss, logits, {"ce": float(ce.detach()), "scale_l1": float(l1.detach())}


def slimming_train(model: nn.Module, cfg: SlimmingConfig, data: DataBundle | None,
                   progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place with the L1 penalty on its normalization scales.

    Returns:
        The training summary plus the mean |gamma| before and after.

    Raises:
        ConfigError: no data, or a model without normalization layers with a scale.
    """
    norms = [m for m in model.modules()
             if isinstance(m, NORMS) and getattr(m, "weight", None) is not None]
    if not norms:
        raise ConfigError("slimming needs normalization layers with a learnable scale "
                          "(BatchNorm/GroupNorm/LayerNorm); this model has none")
    if data is None:
        raise ConfigError("slimming trains the model: give training data (--data)")

    def mean_scale() -> float:
        return float(torch.cat([m.weight.detach().abs().flatten() for m in norms]).mean())

    before = mean_scale()
    summary = fit(model, data, cfg.train, objective=NormScaleL1(cfg.penalty), progress=progress,
                  label="slimming")
    return {**summary, "mean_abs_scale_before": before, "mean_abs_scale_after": mean_scale()}
