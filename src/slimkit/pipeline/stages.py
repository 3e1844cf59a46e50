"""The stage registry: every technique a recipe can name, as ``model -> model + record``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimkit.core.config import SlimConfig
from slimkit.core.record import Record
from slimkit.core.registry import Registry
from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel


@dataclass
class StageContext:
    """What a stage may use besides the model: data, the uncompressed teacher, logging."""

    data: DataBundle | None
    teacher: SlimModel
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print
    workdir: Path | None = None  # where a stage's training checkpoints go (resumable)
    extras: dict[str, Any] = field(default_factory=dict)


StageFn = Callable[[SlimModel, Any, StageContext], tuple[SlimModel, Record]]


@dataclass(frozen=True)
class StageSpec:
    """A stage kind: its config class (with a ``kind`` literal) and the function applying it."""

    config: type[SlimConfig]
    apply: StageFn


STAGES: Registry[StageSpec] = Registry("stage kind")


def register_stage(config: type[SlimConfig]) -> Callable[[StageFn], StageFn]:
    """Register ``fn`` as the stage whose kind is ``config``'s ``kind`` default."""

    def add(fn: StageFn) -> StageFn:
        STAGES.register(config.model_fields["kind"].default, StageSpec(config, fn))
        return fn

    return add
