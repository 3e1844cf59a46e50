"""Distillation configs: which terms to add to the training objective, and their weights.

One :class:`DistillConfig` holds every term; each term has its own small config so that a
recipe can switch terms on and off independently. Layers are named as in
``model.named_modules()`` (rule: select layers by name, never by module object).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slimkit.core.config import SlimConfig
from slimkit.core.stages import StageConfig, stage_config
from slimkit.train.config import TrainConfig

__all__ = ["AssistantConfig", "DistillConfig", "DistillStageConfig", "FeaturePair",
           "FinetuneConfig", "Layout", "LogitKD", "SelfDistill", "TransformerKD"]

Layout = Literal["auto", "channels_first", "channels_last"]
_LAYOUT_HELP = ("How to read a 3-D feature: channels_first [B, C, L] (Conv1d), channels_last "
                "[B, T, D] (transformer tokens), or auto (inferred from the layer types).")


class LogitKD(SlimConfig):
    """Soft targets from the teacher's judged output, mixed with the task's hard-label loss.

    ``alpha·hard + (1−alpha)·soft``, per the data's task (:mod:`slimkit.distill.outputs`):

    - classification: cross-entropy and Hinton et al.'s (2015) ``T²·KL`` on the logits;
    - causal_lm: next-token cross-entropy and ``T²·KL`` per token over the vocabulary, both
      averaged over the tokens ``attention_mask`` keeps;
    - regression: MSE to the targets and MSE to the teacher's output;
    - embedding: no labels, so only the soft part: ``1 − cosine`` (or MSE) between the
      student's and the teacher's mean-pooled embeddings (``alpha`` and ``temperature`` unused).
    """

    temperature: float = Field(4.0, gt=0.0, description="Softening temperature T (> 0) of the "
                                                         "KL (classification, causal_lm).")
    alpha: float = Field(0.5, ge=0.0, le=1.0,
                         description="Weight of the hard-label loss (cross-entropy, next-token "
                                     "cross-entropy, MSE to the targets); the soft-target term "
                                     "gets 1 - alpha. Unused for embedding (no labels).")
    loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="How the student's output is compared with the teacher's: kl "
                            "(softened class or token distributions: classification, "
                            "causal_lm), mse (regression outputs, or embeddings), cosine "
                            "(1 - cosine of embeddings). auto: kl for classification and "
                            "causal_lm, mse for regression, cosine for embedding.")


class FeaturePair(SlimConfig):
    """Match one student layer's output to one teacher layer's output."""

    student: str = Field(..., description="Student layer name (model.named_modules()).")
    teacher: str = Field(..., description="Teacher layer name (model.named_modules()).")
    weight: float = Field(1.0, ge=0.0, description="Weight of this term in the total loss.")
    loss: Literal["hint", "attention", "relational"] = Field(
        "hint", description="hint: MSE after a learned projector (FitNets); attention: "
                            "attention transfer (Zagoruyko & Komodakis); relational: "
                            "similarity preserving (Tung & Mori).")
    layout: Layout = Field("auto", description=_LAYOUT_HELP)


class TransformerKD(SlimConfig):
    """TinyBERT-style intermediate-layer matching of hidden states and attention maps."""

    student_layers: list[str] = Field(
        ..., min_length=1, description="Student transformer block names, shallow to deep.")
    teacher_layers: list[str] = Field(
        ..., min_length=1, description="Teacher block names, paired one-to-one with "
                                       "student_layers (the TinyBERT layer mapping).")
    hidden_weight: float = Field(1.0, ge=0.0,
                                 description="Weight of the hidden-state MSE, summed over pairs.")
    attention_weight: float = Field(
        1.0, ge=0.0, description="Weight of the attention-probability MSE, summed over pairs; "
                                 "0 disables it (needed for blocks without q/k linears).")

    @model_validator(mode="after")
    def _paired(self) -> TransformerKD:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(
                f"student_layers has {len(self.student_layers)} names but teacher_layers has "
                f"{len(self.teacher_layers)}; give one teacher block per student block")
        if self.hidden_weight == 0 and self.attention_weight == 0:
            raise ValueError("hidden_weight and attention_weight are both 0; set one > 0 or "
                             "drop the transformer term")
        return self


class SelfDistill(SlimConfig):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): auxiliary exits taught by the final logits.

    Each exit head pools the named layer's output to ``[B, C]`` and maps it to the classes with
    a Linear; it is trained with CE on the labels, plus ``weight`` times the soft-target KD from
    the model's final logits (detached), plus ``feature_weight`` times an MSE hint from the
    pooled exit feature to the pooled deepest feature (detached).
    """

    exits: list[str] = Field(..., min_length=1,
                             description="Layer names that get an auxiliary exit head.")
    temperature: float = Field(3.0, gt=0.0, description="Temperature of the exits' KD term.")
    weight: float = Field(1.0, ge=0.0,
                          description="Weight of the KD from the final logits to each exit.")
    feature_weight: float = Field(0.0, ge=0.0,
                                  description="Weight of the feature hint from each exit to the "
                                              "deepest feature; 0 disables it.")
    feature_layer: str | None = Field(
        None, description="Layer giving the deepest feature for the hint; None uses the last "
                          "of exits.")
    layout: Layout = Field("auto", description=_LAYOUT_HELP)

    @model_validator(mode="after")
    def _unique(self) -> SelfDistill:
        repeated = sorted({n for n in self.exits if self.exits.count(n) > 1})
        if repeated:
            raise ValueError(f"exits lists {', '.join(repeated)} more than once")
        return self


class DistillConfig(SlimConfig):
    """Knowledge distillation: the terms added to the student's training objective.

    It carries no ``kind``/``version`` of its own: it is the loss part of a stage config
    (which has them), not a stage.

    The student's loss is the logit KD term when ``logits`` is set (else plain cross-entropy),
    plus the weighted feature, transformer and self-distillation terms.

    Example:
        >>> DistillConfig(logits=LogitKD(temperature=4),
        ...               features=[FeaturePair(student="layer2", teacher="layer3")])
    """

    logits: LogitKD | None = Field(default_factory=LogitKD,
                                   description="Logit KD (needs a teacher); null for none.")
    features: list[FeaturePair] = Field(default_factory=list,
                                        description="Feature pairs to match (need a teacher).")
    transformer: TransformerKD | None = Field(
        None, description="TinyBERT-style block matching (needs a teacher).")
    self_distill: SelfDistill | None = Field(
        None, description="Self-distillation exits (works without a teacher).")

    @model_validator(mode="after")
    def _some_term(self) -> DistillConfig:
        if self.logits is None and not self.features and self.transformer is None \
                and self.self_distill is None:
            raise ValueError("no distillation term is set; set at least one of logits, "
                             "features, transformer or self_distill")
        return self

    @property
    def needs_teacher(self) -> bool:
        """Whether any configured term reads a teacher's outputs."""
        return self.logits is not None or bool(self.features) or self.transformer is not None


class FinetuneConfig(TrainConfig):
    """Fine-tuning after a compression step, optionally distilled from the uncompressed model."""

    distill: DistillConfig | None = Field(
        None, description="Distil from the teacher (by default the model before compression).")

    @model_validator(mode="before")
    @classmethod
    def _from_train_config(cls, data: Any) -> Any:
        """Accept a plain TrainConfig where a FinetuneConfig is expected (no distillation)."""
        if isinstance(data, TrainConfig) and not isinstance(data, FinetuneConfig):
            return data.model_dump()
        return data


class AssistantConfig(SlimConfig):
    """A teacher assistant (Mirzadeh et al. 2020): a mid-sized model distilled first."""

    model: str = Field(..., description="zoo:NAME of the assistant's architecture.")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="Zoo kwargs that size it (width, dim, ...).")
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="How the assistant is trained from the teacher.")


@stage_config
class DistillStageConfig(StageConfig):
    """Train the current model as a student of a teacher."""

    kind: Literal["distill"] = "distill"
    version: Literal[1] = Field(1, description="Config schema version.")
    teacher: str | None = Field(
        None, description="Teacher model (artifact, .pt2, zoo:NAME); default: the model "
                          "before compression.")
    loss: DistillConfig = Field(default_factory=DistillConfig, description="Loss terms.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    assistant: AssistantConfig | None = Field(
        None, description="Distil teacher -> assistant -> student in two steps.")

    def needs_data(self) -> str | None:
        return "needs training data"
