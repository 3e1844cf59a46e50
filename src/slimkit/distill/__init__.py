"""Knowledge distillation: losses, feature taps, and the objective the training loop minimizes.

Layers: :mod:`~slimkit.distill.losses` holds pure tensor functions (one per paper);
:mod:`~slimkit.distill.hooks` captures intermediate outputs by layer name;
:mod:`~slimkit.distill.projectors` adapts feature widths and layouts;
:mod:`~slimkit.distill.outputs` says how each task's output is trained (softmax KD for class
or token logits, MSE for a regressor, cosine of the embeddings for an encoder);
:func:`build_objective` composes them into an :class:`~slimkit.train.objective.Objective` for
the one training loop in ``train/`` (distillation owns no loop of its own). Names are imported
on first use (see :mod:`slimkit.core.lazy`); the configs need no torch.

Example:
    >>> cfg = DistillConfig(logits=LogitKD(temperature=4.0, alpha=0.5),
    ...                     features=[FeaturePair(student="layer2", teacher="layer3")])
    >>> objective = build_objective(student, teacher, cfg, example_x=x[:8])
    >>> loss, logits, parts = objective(student, x, y)
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.distill.config": ("AssistantConfig", "DistillConfig", "DistillStageConfig",
                               "FeaturePair", "FinetuneConfig", "LogitKD", "SelfDistill",
                               "TransformerKD"),
    "slimkit.distill.hooks": ("FeatureTaps", "attention_probs", "find_attention"),
    "slimkit.distill.losses": ("attention_map_loss", "attention_transfer_loss",
                               "cosine_embedding_loss", "hidden_state_loss", "hint_loss",
                               "kd_loss", "output_mse_loss", "similarity_preserving_loss",
                               "soft_target_kl"),
    "slimkit.distill.objective": ("FEATURE_LOSSES", "DistillObjective", "build_objective"),
    "slimkit.distill.outputs": ("TASK_TERMS", "output_loss"),
    "slimkit.distill.run": ("distill", "finetune"),
})
