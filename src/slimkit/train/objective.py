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


class TaskLoss(Objective):
    """Training on a task's own loss (:mod:`slimkit.measure.tasks`): mean squared error for
    regression, next-token cross-entropy for a causal language model, cosine to the
    uncompressed model's embedding (``reference``, never trained) for an encoder."""

    def __init__(self, task: str, reference: nn.Module | None = None) -> None:
        super().__init__()
        from slimkit.measure.tasks import get_task

        self.task = get_task(task)
        self._reference = (reference,)  # a tuple: not a submodule, so never trained

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        out = B.call(model, x)
        ref = None
        if self._reference[0] is not None:
            with torch.no_grad():
                ref = B.call(self._reference[0].eval(), x)
        loss = self.task.loss(out, x, y, ref)
        return loss, B.select(out), {self.task.name: float(loss.detach())}


def default_objective(task: str, reference: nn.Module | None = None) -> Objective:
    """Cross-entropy for classification, the task's own loss otherwise (``reference``: the
    uncompressed model, which an embedding task trains towards)."""
    return CrossEntropy() if task == "classification" else TaskLoss(task, reference)
