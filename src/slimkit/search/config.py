"""The recipe's ``search:`` block: what an automated search may change, and how it searches.

Imports no torch (a recipe is validated before any model loads). Every field has a default,
so a recipe without a ``search:`` block searches the common case: one structured-pruning
ratio per prunable group, the recipe's other stages kept, single-objective TPE on the proxy
metric under the recipe's ``target:``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.config import SlimConfig
from slimkit.distill.config import FinetuneConfig

Objective = Literal["metric", "latency", "size", "flops"]
Bits = Literal["float", 8, 4]


class PruneSpace(SlimConfig):
    """Structured pruning: one ratio per group (or one for all), optional block removal."""

    ratios: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75], min_length=1,
        description="Channel shares each group may lose (each in [0, 1)); 0 leaves it whole.")
    groups: Literal["layer", "uniform"] = Field(
        "layer", description="layer: one choice per prunable group (named by its root layer); "
                             "uniform: one ratio for every group.")
    blocks: list[float] = Field(
        [0.0], min_length=1, description="Shares of the removable residual blocks that may be "
                                         "removed whole ([0.0]: none).")
    criterion: str = Field("l2", description="Importance criterion of the pruning stages.")
    round_to: int = Field(1, ge=1, description="Kept channel counts are a multiple of this.")
    max_groups: int = Field(
        24, ge=1, le=512, description="Most searched groups; more are bucketed in model order "
                                      "(neighbouring groups share one choice).")

    @field_validator("ratios", "blocks")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= r < 1.0 for r in v):
            raise ValueError(f"every share must be in [0, 1), got {v}")
        return sorted(set(v))


class QuantSpace(SlimConfig):
    """Weight bits per layer (weight-only quantization; 'float' leaves a layer as it is)."""

    bits: list[Bits] = Field(["float", 8, 4], min_length=1,
                             description="Widths each layer may take.")
    groups: Literal["layer", "uniform"] = Field(
        "layer", description="layer: one width per Linear/Conv layer; uniform: one for all.")
    group_size: int = Field(0, ge=0, description="Input columns sharing a scale (0: per output "
                                                 "channel).")
    max_groups: int = Field(24, ge=1, le=512, description="Most searched layers (bucketed).")


class LowRankSpace(SlimConfig):
    """Low-rank factorization: the share of each layer's weights its factors keep."""

    ratios: list[float] = Field([1.0, 0.5, 0.25], min_length=1,
                                description="Shares kept per layer (1.0: not factorized).")
    max_groups: int = Field(24, ge=1, le=512, description="Most searched layers (bucketed).")

    @field_validator("ratios")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError(f"every share must be in (0, 1], got {v}")
        return sorted(set(v), reverse=True)


class ProxyOptions(SlimConfig):
    """The cheap evaluation of every trial (BatchNorm re-estimated, validation metric)."""

    calib_samples: int = Field(128, ge=2, description="Training samples (class-stratified) "
                                                      "the BatchNorm statistics are re-estimated "
                                                      "on.")
    calib_batch_size: int = Field(32, ge=2, description="Samples per re-estimation batch.")
    val_samples: int | None = Field(
        512, ge=1, description="Validation samples the proxy metric is measured on (the "
                               "first of the val split; null: all). Never the test split.")


class LatencyOptions(SlimConfig):
    """How each trial is timed, interleaved against the baseline in the same process."""

    runtime: Literal["onnxruntime", "torch"] | None = Field(
        None, description="Runtime timed (default: the target's min_speedup runtime, else "
                          "onnxruntime).")
    batch: int | None = Field(None, ge=1, description="Batch timed (default: the target's, "
                                                      "else 32).")
    repeats: int = Field(10, ge=3, description="Timed rounds per trial.")
    warmup: int = Field(2, ge=0, description="Untimed rounds per trial.")


class SensitivityOptions(SlimConfig):
    """Per-layer sensitivity, measured once before any trial and used to shape the space
    and seed the first trials (see :mod:`slimkit.search.sensitivity`).

    Each searched setting (a group's pruning ratio, a layer's bits, a layer's low-rank share)
    is applied alone, the rest of the model left as it is, and the proxy metric's drop is
    measured (BatchNorm re-estimated, validation split): the one-at-a-time lesion mixed
    precision measures per bit width, with the stages the trials apply.
    """

    shape: bool = Field(
        True, description="Exclude from the space each setting whose drop alone already "
                          "exceeds the budget, and every more aggressive setting of that "
                          "dimension (the mildest is always kept); recorded in the report.")
    seeds: int = Field(
        3, ge=0, le=64, description="Sensitivity-guided allocations enqueued as the first "
                                    "trials (each dimension at its most aggressive setting "
                                    "whose drop alone stays under a threshold; counted in "
                                    "the trials).")
    budget: float | None = Field(
        None, gt=0, description="Drop of the searched metric (in its own units, e.g. 0.01 "
                                "for one top-1 point) one setting alone may cause (default: "
                                "the target's max_metric_drop or max_accuracy_drop; with "
                                "neither, nothing is excluded).")


class SearchConfig(SlimConfig):
    """What an automated search may change in the recipe, and how it searches.

    A candidate recipe is: the pruning stages the search chose, then the quantization and
    low-rank stages it chose, then the recipe's own stages (those of a searched kind
    excepted: the search replaces them; each may be switched off with ``toggle_stages``).
    """

    version: Literal[1] = Field(1, description="Search block schema version.")
    trials: int = Field(30, ge=1, le=100_000, description="Trials in the study (all workers).")
    sampler: Literal["auto", "tpe", "nsga2", "amc", "random"] = Field(
        "auto", description="auto: tpe for one objective, nsga2 for several; amc: a "
                            "layer-by-layer policy choosing pruning ratios under the FLOPs "
                            "budget, rewarded by the proxy metric.")
    objectives: list[Objective] = Field(
        ["metric"], min_length=1, description="Optimized together (the target's criteria are "
                                              "constraints): metric, latency, size, flops.")
    prune: PruneSpace | None = Field(default_factory=PruneSpace,
                                     description="Structured pruning space (null: off).")
    quant: QuantSpace | None = Field(None, description="Weight bits per layer (null: off).")
    lowrank: LowRankSpace | None = Field(None, description="Low-rank shares (null: off).")
    toggle_stages: bool = Field(False, description="Each of the recipe's own stages may be "
                                                   "switched off.")
    warm_start: bool = Field(
        True, description="The first trials are the uniform allocations (every pruned group "
                          "at one ratio of the grid, in turn): the hand recipe's shape, as "
                          "anchors for the sampler (counted in the trials).")
    flops_budget: float | None = Field(
        None, gt=0, le=1, description="Largest share of the baseline FLOPs a candidate keeps "
                                      "(a constraint, with the target's).")
    front: int = Field(3, ge=1, le=64, description="Best feasible candidates measured for "
                                                   "real (fine-tuned when finetune is set, "
                                                   "timed with the recipe's measure options).")
    finetune: FinetuneConfig | None = Field(
        None, description="Short fine-tuning of the front candidates only (added to the last "
                          "searched pruning stage of the written recipe).")
    sensitivity: SensitivityOptions | None = Field(
        default_factory=SensitivityOptions,
        description="Per-layer sensitivity measured once before the trials (cached in the "
                    "output directory and the study), shaping the space and seeding the "
                    "first trials (null or false: off).")
    proxy: ProxyOptions = Field(default_factory=ProxyOptions, description="Proxy evaluation.")
    latency: LatencyOptions = Field(default_factory=LatencyOptions,
                                    description="Per-trial timing.")
    heartbeat: int = Field(10, ge=1, le=3600, description="Seconds between a running trial's "
                                                          "heartbeats; a trial silent for 3x "
                                                          "this is failed and re-queued.")

    @field_validator("objectives")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"objectives repeat a name: {v}")
        return v

    @field_validator("sensitivity", mode="before")
    @classmethod
    def _switch(cls, v: object) -> object:
        if v is True:
            return {}
        return None if v is False else v

    @model_validator(mode="after")
    def _something_to_search(self) -> SearchConfig:
        if self.prune is None and self.quant is None and self.lowrank is None \
                and not self.toggle_stages:
            raise ValueError("nothing to search: set prune, quant, lowrank or toggle_stages")
        if self.sampler == "amc" and self.prune is None:
            raise ValueError("sampler 'amc' chooses pruning ratios: set prune")
        return self


__all__ = ["LatencyOptions", "LowRankSpace", "PruneSpace", "ProxyOptions", "QuantSpace",
           "SearchConfig", "SensitivityOptions"]
