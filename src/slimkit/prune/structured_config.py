"""The structured-pruning config: what to remove, how to choose it, and checks on the values.

This module imports no torch (recipes are validated before torch loads); the criterion and
allocation names are looked up in their registries, imported when a config names one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.errors import ConfigError
from slimkit.core.stages import StageConfig, stage_config
from slimkit.distill.config import FinetuneConfig
from slimkit.prune.config import SlimmingConfig

TARGET_KEYS = ("flops", "params", "latency")


def _known(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except ConfigError as exc:  # a ValueError, so recipes report it under its key path
        raise ValueError(str(exc)) from None
    return name


@stage_config
class StructuredPruneConfig(StageConfig):
    """Remove whole channels, heads and conv groups; the model gets physically smaller."""

    kind: Literal["structured_prune"] = "structured_prune"
    version: Literal[1] = Field(1, description="Config schema version.")
    ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Share of the channels of the prunable groups to "
                                          "remove (0 <= ratio < 1). Give ratio OR target.")
    target: dict[str, float] | None = Field(
        None, description="Measured goal instead of a ratio: {'flops': 0.5} keeps 50% of the "
                          "FLOPs; also 'params' and 'latency' (torch eager, batch of the "
                          "example inputs), alone or together (all must be met). Pruning grows "
                          "until the measurements reach it; the record says achieved vs asked.")
    blocks: float | Literal["auto"] = Field(
        0.0, description="Depth pruning, before channels: share (0..1) of the removable "
                         "residual blocks (y = x + f(x), identity shortcut) whose branch f is "
                         "removed whole, those the output depends on least first. 'auto' "
                         "(with a target holding 'latency' and 'flops' or 'params'): of the "
                         "block counts with which channel pruning meets every target, the "
                         "one whose output on the calibration data (BatchNorm statistics "
                         "re-estimated) moves least; without data, the one keeping the most "
                         "FLOPs (params). With steps > 1 the channels are then pruned in "
                         "steps (the search's width step is not reused). Removing blocks "
                         "cuts latency where channel pruning cannot: small convolutions on "
                         "CPU cost per op, not per FLOP.")
    criterion: str = Field("l2", description="Importance criterion: l1, l2, taylor, bn_scale, "
                                             "fpgm, random.")
    allocation: str = Field("global", description="uniform: same ratio per group; global: one "
                                                  "ranking across groups.")
    round_to: int = Field(1, ge=1, description="Kept channel counts are a multiple of this "
                                               "(e.g. 8 for fast kernels).")
    max_layer_ratio: float = Field(0.9, gt=0.0, lt=1.0,
                                   description="Never remove more than this share of a group.")
    include: list[str] = Field(default_factory=list,
                               description="Only prune groups rooted at these layers "
                                           "(name, re:REGEX, type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers' tensors untouched (name, "
                                           "re:REGEX, type:Class).")
    latency_threads: int = Field(1, ge=1, description="Threads when timing a latency target "
                                                      "(1 gives the steadiest measurement).")
    latency_batches: list[int] | None = Field(
        None, description="Batch sizes a latency target is timed at (the example inputs "
                          "cycled to each size); the slowest ratio counts. Default: the "
                          "example inputs as given.")
    calib_batches: int = Field(4, ge=1, description="Batches of training data (class-"
                                                    "stratified) for the taylor criterion, "
                                                    "block scores and BatchNorm re-estimation.")
    calib_batch_size: int = Field(32, ge=1, description="Samples per calibration batch.")
    steps: int = Field(1, ge=1, description="Prune in this many equal steps, fine-tuning after "
                                            "each one when finetune is set.")
    seed: int = Field(0, description="Seed of the random criterion and of the calibration "
                                     "sample.")
    attention: Literal["heads", "head_dims"] = Field(
        "heads", description="How attention shrinks: 'heads' removes whole heads; 'head_dims' "
                             "removes the same positions inside every head of q/k/v (and the "
                             "out-projection inputs they feed), so all heads keep one smaller "
                             "head size; the softmax scale stays 1/sqrt(original head size).")
    hf_loadable: Literal["auto"] | bool = Field(
        "auto", description="Keep a Hugging Face transformers model loadable by "
                            "from_pretrained after save_pretrained: prune only what its config "
                            "can say (one FFN width for every layer: intermediate_size / "
                            "n_inner; whole heads where the config keeps the head size, as "
                            "ViT's head_dim) and sync the config; the hidden size, per-layer "
                            "head counts (transformers 5 has no config.pruned_heads), the pooler "
                            "and residual branches stay, each skip recorded. 'auto': on for "
                            "transformers models whose config can say at least one pruned "
                            "width (BERT, GPT-2, ViT...), off for the others (ResNet...); "
                            "false: prune freely (the slimkit artifact still reloads it). "
                            "Models without a transformers config ignore it.")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune after pruning (after each step), optionally distilled from "
                          "the unpruned model (finetune.distill).")
    slimming: SlimmingConfig | None = Field(
        None, description="Network Slimming: first train with an L1 penalty on the "
                          "normalization scales, then prune (pair with criterion bn_scale).")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        from slimkit.prune.criteria import CRITERIA  # torch: only when a recipe names one

        return _known(CRITERIA, v)

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v: str) -> str:
        from slimkit.prune.allocate import ALLOCATORS

        return _known(ALLOCATORS, v)

    @field_validator("target")
    @classmethod
    def _valid_target(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v or not set(v) <= set(TARGET_KEYS):
            raise ValueError(f"target keys must be among {list(TARGET_KEYS)}, got {sorted(v)}")
        for key, frac in v.items():
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"target {key} must be in (0, 1] (share to keep), got {frac}")
        return {k: v[k] for k in TARGET_KEYS if k in v}  # primary metric first

    @field_validator("latency_batches")
    @classmethod
    def _positive_batches(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"latency_batches must be positive batch sizes, got {v}")
        return v

    @field_validator("blocks")
    @classmethod
    def _valid_blocks(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"blocks must be a share in [0, 1] or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _ratio_or_target(self) -> StructuredPruneConfig:
        if (self.ratio is None) == (self.target is None):
            raise ValueError("give exactly one of ratio (share of channels to remove) or "
                             "target (e.g. {'flops': 0.5})")
        if self.blocks == "auto" and not (self.target and "latency" in self.target
                                          and len(self.target) > 1):
            raise ValueError("blocks 'auto' picks how many residual blocks to remove so that "
                             "pruning to a flops/params target also meets a latency target: "
                             "give target with 'latency' and 'flops' or 'params', or a share")
        return self

    def needs_data(self) -> str | None:
        if self.slimming is not None:
            return "slimming needs training data"
        if self.finetune is not None:
            return "finetune needs data"
        if self.criterion == "taylor":
            return "criterion 'taylor' needs calibration data"
        return None


__all__ = ["TARGET_KEYS", "StructuredPruneConfig"]
