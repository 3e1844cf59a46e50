"""What the training loop minimizes: an Objective maps (model, x, y) to a loss.

The loop owns no loss of its own, so distillation, QAT penalties or sparsity regularizers plug
in as objectives. An objective is an ``nn.Module``: its own parameters (projectors, early-exit
heads) are trained together with the model.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.io import batch as B


class Objective(nn.Module):
    """Base class: ``forward(model, x, y) -> (loss, logits, parts)``.

    ``logits`` are the model's outputs (for training accuracy); ``parts`` maps a loss term's
    name to its float value, for logging.
    """

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class CrossEntropy(Objective):
    """Plain supervised training: cross-entropy on the labels."""

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = B.select(B.call(model, x))
        loss = nn.functional.cross_entropy(logits, y)
        return loss, logits, {"ce": float(loss.detach())}
