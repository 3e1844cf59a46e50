"""Training the exit heads: self-distillation from the final logits, in the one loop.

The objective is Hinton's KD (:func:`slimkit.distill.losses.kd_loss`) from the model's own
final logits (detached) to every exit, plus, when the backbone trains too (``joint``), the
final head's cross-entropy. With a frozen backbone, its parameters do not train and its
batch-norm statistics are left alone (it runs in eval mode), so the static model is exactly
the one given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from slimkit.data.bundle import DataBundle
from slimkit.distill.losses import kd_loss
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel
from slimkit.io import batch as B
from slimkit.io.model import modes_kept, set_mode
from slimkit.train.loop import fit
from slimkit.train.objective import Objective


class ExitObjective(Objective):
    """Sum over exits of ``alpha·CE(exit, y) + (1-alpha)·T²·KL(final/T ‖ exit/T)``; the final
    head's CE is added when the backbone trains (``joint``)."""

    def __init__(self, cfg: EarlyExitConfig) -> None:
        super().__init__()
        self.cfg = cfg.model_copy(deep=True)

    def forward(self, model: nn.Module, x: B.Inputs, y: Tensor,
                ) -> tuple[Tensor, Tensor, dict[str, float]]:
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        assert isinstance(inner, EarlyExitModel)
        if self.cfg.mode == "frozen":
            with torch.no_grad(), modes_kept(inner.backbone):
                set_mode(inner.backbone, False)
                feats, final = _features(inner, x)
        else:
            feats, final = _features(inner, x)
        parts: dict[str, float] = {}
        loss = final.new_zeros(())
        for k, feat in enumerate(feats):
            term = kd_loss(inner.heads[k](feat), final.detach(), y, self.cfg.temperature,
                           self.cfg.alpha)
            parts[f"exit{k}"] = float(term.detach())
            loss = loss + term
        if self.cfg.mode == "joint":
            ce = F.cross_entropy(final, y)
            parts["final_ce"] = float(ce.detach())
            loss = loss + ce
        return loss, final, parts


def _features(model: EarlyExitModel, x: B.Inputs) -> tuple[list[Tensor], Tensor]:
    """Every exit block's output and the final logits, for the whole batch."""
    segments = model.segments()
    state: Any = None
    feats = []
    for k, seg in enumerate(segments[:-1]):
        state, feat = B.call(seg.module, x) if k == 0 else seg.module(*state)
        feats.append(feat)
    return feats, model.judged(segments[-1].module(*state))


def held_out(data: DataBundle, fraction: float) -> tuple[DataBundle, tuple[Any, Tensor]]:
    """The data the heads train on and the calibration part, disjoint.

    The calibration part is the bundle's held-out validation split when it has one (the
    heads then train on the whole training split), else a class-stratified ``fraction`` of
    the training split (seed 0), which the heads then never see. The bundle returned is a
    plain one whose ``test`` split is the calibration part, so that training never reads the
    real test split.
    """
    from slimkit.data.split import split_indices

    if getattr(data, "y_val", None) is not None:
        x_train, y_train = data.x_train, data.y_train
        x_cal, y_cal = data.x_val, data.y_val
    else:
        keep, cal = (torch.from_numpy(i) for i in split_indices(data.y_train, fraction, seed=0))
        x_cal, y_cal = B.take(data.x_train, cal), data.y_train[cal]
        x_train, y_train = B.take(data.x_train, keep), data.y_train[keep]
    train = DataBundle(f"{data.name} (early-exit heads)", x_train, y_train, x_cal, y_cal,
                       data.num_classes, meta=dict(data.meta), task=data.task)
    return train, (x_cal, y_cal)


def train_heads(model: EarlyExitModel, data: DataBundle, cfg: EarlyExitConfig,
                progress: bool = False, checkpoint_dir: Any = None) -> dict[str, Any]:
    """Train ``model``'s heads (and, for ``joint``, its backbone) in place on ``data``'s
    training split with :func:`slimkit.train.fit`. Returns fit's summary."""
    frozen = cfg.mode == "frozen"
    flags = [(p, p.requires_grad) for p in model.backbone.parameters()]
    if frozen:
        for p, _ in flags:
            p.requires_grad_(False)
    try:
        return fit(model, data, cfg.train, objective=ExitObjective(cfg), progress=progress,
                   checkpoint_dir=checkpoint_dir, label="early-exit heads")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
