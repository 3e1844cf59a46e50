"""The ``early_exit`` config: where exits go, how they are trained and how their thresholds
are chosen (no torch here: recipes are validated before torch loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slimkit.core.stages import StageConfig, stage_config
from slimkit.train.config import TrainConfig

Confidence = Literal["max_softmax", "entropy", "margin"]
Pooling = Literal["auto", "mean", "cls"]


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=10, lr=3e-3, batch_size=64)


@stage_config
class EarlyExitConfig(StageConfig):
    """Dynamic inference: exit heads after chosen blocks, calibrated confidence thresholds.

    Each exit is a head (optionally a convolution, then pooling, a LayerNorm for token
    features, one Linear) on the output of a block. The heads are trained by
    self-distillation from the model's final logits (Hinton's KD,
    :func:`slimkit.distill.losses.kd_loss`), with the backbone frozen or
    jointly; then one threshold per exit is chosen on the validation split (a held-out 20%
    of the training split, never the test split) so that the top-1 of the dynamic model stays
    within ``max_drop`` points of the static model's, with a ``margin`` for the noise of that
    estimate (by default its one-sided 95% upper confidence bound must fit). Hugging Face
    transformers models (ResNet, MobileNetV2, ViT, BERT...) take exits too, after their
    stages or encoder layers (see :mod:`slimkit.exit.hf`). At inference a sample returns at the
    first exit whose confidence reaches its threshold; in a batch, samples that exited are
    removed from the rest of the computation (Teerapittayanon et al., BranchyNet, 2016).

    Example:
        >>> EarlyExitConfig(exits=["layer1", "layer2"], confidence="max_softmax", max_drop=0.5)
    """

    kind: Literal["early_exit"] = "early_exit"
    version: Literal[1] = Field(1, description="Config schema version.")
    exits: list[str] = Field(
        default_factory=list,
        description="Block names (model.named_modules()) to put an exit after, in any order. "
                    "Empty: every residual stage (the last block of each resolution of a CNN's "
                    "block stacks, every transformer block but the last).")
    confidence: Confidence = Field(
        "max_softmax", description="Confidence of an exit's prediction: max_softmax (largest "
                                   "class probability), entropy (minus the entropy of the "
                                   "softmax) or margin (top-1 minus top-2 probability).")
    max_drop: float | None = Field(
        None, ge=0, le=100,
        description="Largest allowed top-1 drop of the dynamic model against the static one "
                    "on the validation split, in points (0..100). None: the recipe target's "
                    "max_accuracy_drop (or max_metric_drop.top1), else 0.5.")
    margin: Literal["ci95", "none"] | float = Field(
        "ci95",
        description="Safety margin for the noise of the validation estimate: ci95 keeps the "
                    "one-sided 95% upper confidence bound of the top-1 drop (Newcombe's paired "
                    "interval, static vs dynamic on the same samples) within max_drop; a "
                    "number in [0.5, 1) is that one-sided confidence level; none keeps the "
                    "measured drop within max_drop (about half the time more on new data).")
    min_exit_fraction: float = Field(
        0.05, ge=0, lt=1,
        description="Close (and remove) an exit that takes fewer than this share of the "
                    "validation samples: each open exit costs every sample passing it a head "
                    "and, in ONNX Runtime, a step boundary.")
    pooling: Pooling = Field(
        "auto", description="How a head reads a token feature [B, T, D]: mean (over tokens) "
                            "or cls (the first token). auto: cls when the model holds a "
                            "parameter called cls_token, else mean. Conv features are "
                            "average-pooled.")
    head: Literal["linear", "conv"] = Field(
        "linear", description="linear: pooling then one Linear; conv: on a conv feature map, a "
                              "3x3 stride-2 convolution (twice the block's channels, "
                              "BatchNorm, ReLU) before the pooling, a stronger head for a "
                              "shallow exit at a small cost (BranchyNet's branches hold "
                              "conv layers); token and vector features get the linear head.")
    mode: Literal["frozen", "joint"] = Field(
        "frozen", description="frozen: only the heads train (the static model is unchanged); "
                              "joint: the backbone trains too, with its own loss.")
    temperature: float = Field(3.0, gt=0, description="KD temperature from the final logits.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the heads' label "
                                                      "cross-entropy; KD gets 1 - alpha.")
    train: TrainConfig = Field(default_factory=_default_train,
                               description="How the exit heads are trained.")
    val_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of the training split held out (class-"
                                       "stratified, seed 0) for calibration; the heads never "
                                       "train on it.")
    report_split: Literal["test", "none"] = Field(
        "test", description="After calibration, measure the exit distribution, per-exit "
                            "top-1 and latency on this split (test: read once, after every "
                            "choice is made; none: skip).")
    latency_samples: int = Field(
        64, ge=0, description="Test samples timed one by one (batch 1, ONNX Runtime, "
                              "interleaved with the static model); 0 skips timing.")

    @field_validator("exits")
    @classmethod
    def _unique(cls, exits: list[str]) -> list[str]:
        repeated = sorted({n for n in exits if exits.count(n) > 1})
        if repeated:
            raise ValueError(f"exits lists {', '.join(repeated)} more than once")
        return exits

    @field_validator("margin")
    @classmethod
    def _level(cls, margin: str | float) -> str | float:
        if not isinstance(margin, str) and not 0.5 <= margin < 1:
            raise ValueError(f"a confidence level is in [0.5, 1), got {margin}")
        return margin

    def margin_level(self) -> float | None:
        """The one-sided confidence level of the drop's bound, None for no margin."""
        return {"ci95": 0.95, "none": None}.get(self.margin, self.margin)  # type: ignore[arg-type]

    def needs_data(self) -> str | None:
        return "needs training data (to train the exit heads and calibrate thresholds)"
