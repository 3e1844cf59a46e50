"""The training config shared by every stage that trains or fine-tunes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimkit.core.config import SlimConfig

# Beyond these a value is a typo, not a plan: training would never end or would diverge.
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
MAX_LR = 10.0


class EarlyStopping(SlimConfig):
    """Stop when validation accuracy has not improved for ``patience`` epochs."""

    patience: int = Field(2, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest accuracy gain that counts.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5,
                                description="Share of the training set held out to monitor.")
    restore_best: bool = Field(True, description="End with the best epoch's weights.")


class TrainConfig(SlimConfig):
    """How to train or fine-tune (optimizer, schedule, length, checkpoints, precision)."""

    epochs: int = Field(1, ge=0, le=MAX_EPOCHS,
                        description=f"Passes over the training set (at most {MAX_EPOCHS:,}).")
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="Train for exactly this many optimizer steps (overrides epochs).")
    batch_size: int = Field(64, ge=1, description="Samples per optimizer step (all ranks).")
    lr: float = Field(1e-3, gt=0, le=MAX_LR,
                      description=f"Peak learning rate (at most {MAX_LR:g}).")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="L2 / decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    scheduler: Literal["none", "cosine", "step"] = Field(
        "cosine", description="LR schedule, stepped per optimizer step.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="'step' schedule: LR factor.")
    step_every: int = Field(1000, ge=1, description="'step' schedule: steps between decays.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps.")
    grad_clip: float | None = Field(None, gt=0, description="Max global gradient norm.")
    amp: Literal["off", "auto", "bf16", "fp16"] = Field(
        "off", description="Mixed precision: auto = fp16 on CUDA, off on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    seed: int = Field(0, description="Seed for shuffling, dropout and initialization.")
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N steps.")
    early_stopping: EarlyStopping | None = Field(None, description="Early stopping.")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.device == "cpu" and self.amp == "fp16":
            raise ValueError("amp 'fp16' needs CUDA; use 'bf16' or 'off' on the CPU")
        return self
