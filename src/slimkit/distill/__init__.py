"""Knowledge distillation: losses, feature taps, and the objective the training loop minimizes.

Layers: :mod:`~slimkit.distill.losses` holds pure tensor functions (one per paper);
:mod:`~slimkit.distill.hooks` captures intermediate outputs by layer name;
:mod:`~slimkit.distill.projectors` adapts feature widths and layouts;
:func:`build_objective` composes them into an :class:`~slimkit.train.objective.Objective` for
the one training loop in ``train/`` (distillation owns no loop of its own).

Example:
    >>> cfg = DistillConfig(logits=LogitKD(temperature=4.0, alpha=0.5),
    ...                     features=[FeaturePair(student="layer2", teacher="layer3")])
    >>> objective = build_objective(student, teacher, cfg, example_x=x[:8])
    >>> loss, logits, parts = objective(student, x, y)
"""

from slimkit.distill.config import (
    DistillConfig,
    FeaturePair,
    LogitKD,
    SelfDistill,
    TransformerKD,
)
from slimkit.distill.hooks import FeatureTaps, attention_probs, find_attention
from slimkit.distill.losses import (
    attention_map_loss,
    attention_transfer_loss,
    hidden_state_loss,
    hint_loss,
    kd_loss,
    similarity_preserving_loss,
    soft_target_kl,
)
from slimkit.distill.objective import FEATURE_LOSSES, DistillObjective, build_objective
from slimkit.distill.run import DistillStageConfig, distill

__all__ = [
    "DistillStageConfig",
    "FEATURE_LOSSES",
    "DistillConfig",
    "DistillObjective",
    "FeaturePair",
    "FeatureTaps",
    "LogitKD",
    "SelfDistill",
    "TransformerKD",
    "attention_map_loss",
    "attention_probs",
    "attention_transfer_loss",
    "build_objective",
    "distill",
    "find_attention",
    "hidden_state_loss",
    "hint_loss",
    "kd_loss",
    "similarity_preserving_loss",
    "soft_target_kl",
]
