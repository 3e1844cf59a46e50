"""The pruning stages' configs (structured pruning's is in ``structured_config``).

This module imports no torch: recipes are validated against these configs before torch or any
model is loaded. The techniques live beside them: ``magnitude``, ``nm``, ``schedule``,
``sparse_train``, ``slimming``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimkit.core.config import SlimConfig
from slimkit.core.stages import StageConfig, stage_config
from slimkit.distill.config import FinetuneConfig
from slimkit.train.config import TrainConfig

PRUNABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class SlimmingConfig(SlimConfig):
    """Sparsity-regularized training before pruning (use with ``criterion: bn_scale``)."""

    penalty: float = Field(1e-4, gt=0.0, description="lambda of the L1 penalty on the "
                                                     "normalization scales (paper: 1e-4..1e-5).")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1),
                               description="The regularized training run.")


@stage_config
class MagnitudePruneConfig(StageConfig):
    """Zero the smallest-magnitude weights."""

    kind: Literal["magnitude_prune"] = "magnitude_prune"
    version: Literal[1] = Field(1, description="Config schema version.")
    sparsity: float = Field(..., ge=0.0, lt=1.0,
                            description="Fraction of the selected weights to set to zero.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one threshold across layers; layer: same ratio each.")
    layer_types: list[str] = Field(list(PRUNABLE), description="Module types to prune.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune afterwards with the masks held fixed (optionally "
                          "distilled from the unpruned model).")

    def needs_data(self) -> str | None:
        return "finetune needs data" if self.finetune is not None else None


@stage_config
class NMPruneConfig(StageConfig):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (2:4 default).

    Example:
        >>> NMPruneConfig(n=2, m=4)  # doctest: +ELLIPSIS
        NMPruneConfig(kind='nm_prune', ...)
    """

    kind: Literal["nm_prune"] = "nm_prune"
    version: Literal[1] = Field(1, description="Config schema version.")
    n: int = Field(2, ge=1, description="Weights kept per group.")
    m: int = Field(4, ge=2, description="Group size (consecutive input weights).")
    layer_types: list[str] = Field(list(PRUNABLE), description="Module types to prune.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune afterwards with the N:M masks held fixed (optionally "
                          "distilled from the unpruned model).")

    @model_validator(mode="after")
    def _check(self) -> NMPruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self

    def needs_data(self) -> str | None:
        return "finetune needs data" if self.finetune is not None else None


@stage_config
class GradualPruneConfig(StageConfig):
    """Prune gradually while fine-tuning, on the cubic (AGP) schedule of Zhu & Gupta (2017).

    Example:
        >>> GradualPruneConfig(final_sparsity=0.9, frequency=50,
        ...                    train=FinetuneConfig(epochs=4))  # doctest: +ELLIPSIS
        GradualPruneConfig(kind='gradual_prune', ...)
    """

    kind: Literal["gradual_prune"] = "gradual_prune"
    version: Literal[1] = Field(1, description="Config schema version.")
    final_sparsity: float = Field(..., ge=0.0, lt=1.0,
                                  description="s_f: fraction of the selected weights zeroed "
                                              "at the end.")
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0,
                                    description="s_i: sparsity of the first pruning step.")
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict,
        description="scope=layer only: a final sparsity per layer name (others use "
                    "final_sparsity), e.g. Deep Compression's per-layer ratios.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one magnitude threshold across layers; layer: each "
                              "layer pruned to its own ratio.")
    start_step: int = Field(0, ge=0, description="t0: optimizer step of the first pruning.")
    frequency: int = Field(100, ge=1, description="Δt: optimizer steps between pruning steps.")
    num_updates: int | None = Field(
        None, ge=1, description="n: pruning steps after the first; default: as many as fit "
                                "in ramp_fraction of the training steps.")
    ramp_fraction: float = Field(
        0.75, gt=0.0, le=1.0, description="When num_updates is not given, the schedule ends "
                                          "after this fraction of training (the rest "
                                          "fine-tunes at the final sparsity).")
    layer_types: list[str] = Field(list(PRUNABLE), description="Module types to prune.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    train: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="The fine-tuning the schedule runs inside (optionally distilled from the "
                    "unpruned model).")

    @model_validator(mode="after")
    def _check(self) -> GradualPruneConfig:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} is above "
                             f"final_sparsity {self.final_sparsity}")
        bad = {k: v for k, v in self.layer_sparsity.items() if not 0.0 <= v < 1.0}
        if bad:
            raise ValueError(f"layer_sparsity values must lie in [0, 1): {bad}")
        if self.layer_sparsity and self.scope != "layer":
            raise ValueError("layer_sparsity needs scope='layer'")
        return self

    def needs_data(self) -> str | None:
        return "needs training data"


@stage_config
class SparseTrainConfig(StageConfig):
    """Train at a fixed sparsity with RigL's drop-and-grow mask updates.

    Example:
        >>> SparseTrainConfig(sparsity=0.9, distribution="erk")  # doctest: +ELLIPSIS
        SparseTrainConfig(kind='sparse_train', ...)
    """

    kind: Literal["sparse_train"] = "sparse_train"
    version: Literal[1] = Field(1, description="Config schema version.")
    sparsity: float = Field(..., gt=0.0, lt=1.0,
                            description="Fraction of the selected weights kept at zero.")
    distribution: Literal["erk", "uniform"] = Field(
        "erk", description="How sparsity is spread over layers: ERK (small layers denser) "
                           "or the same ratio in every layer.")
    update_every: int = Field(100, ge=1, description="ΔT: optimizer steps between updates.")
    drop_fraction: float = Field(0.3, gt=0.0, lt=1.0,
                                 description="alpha: fraction of active weights exchanged at "
                                             "the first update (cosine-decayed).")
    end_fraction: float = Field(0.75, gt=0.0, le=1.0,
                                description="No mask updates after this fraction of training.")
    layer_types: list[str] = Field(list(PRUNABLE), description="Module types to sparsify.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers alone (name, re:REGEX, type:).")
    train: FinetuneConfig = Field(default_factory=FinetuneConfig,
                                  description="The training run (optionally distilled).")

    def needs_data(self) -> str | None:
        return "needs training data"
