"""Distillation as training: fine-tuning with a teacher, the ``distill`` stage, teacher assistants.

Distillation owns no loop: it builds an Objective and hands it to ``slimkit.train.fit``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.distill.config import (  # noqa: F401  (also importable from here)
    AssistantConfig,
    DistillConfig,
    DistillStageConfig,
    FinetuneConfig,
)
from slimkit.distill.objective import build_objective
from slimkit.io.model import SlimModel
from slimkit.train.config import TrainConfig
from slimkit.train.loop import evaluate, fit


def finetune(model: nn.Module, data: DataBundle, cfg: TrainConfig,
             teacher: nn.Module | None = None,
             after_step: Callable[[nn.Module], None] | None = None,
             progress: bool = False, label: str = "fine-tune",
             checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``model`` in place; with ``cfg.distill`` the loss distils from ``teacher``.

    Raises:
        ConfigError: distillation asks for a teacher and none is given.
    """
    distill_cfg = getattr(cfg, "distill", None)
    objective = None
    if distill_cfg is not None:
        if distill_cfg.needs_teacher and teacher is None:
            raise ConfigError(f"{label}: distill needs a teacher model and none was given")
        objective = build_objective(model, teacher, distill_cfg, data.x_train[:2])
    return fit(model, data, cfg, objective=objective, after_step=after_step,
               checkpoint_dir=checkpoint_dir, progress=progress, label=label)


def _distill(student: nn.Module, teacher: nn.Module | None, data: DataBundle,
             cfg: DistillStageConfig, assistant: nn.Module | None = None,
             progress: bool = False, checkpoint_dir: str | Path | None = None,
             ) -> tuple[nn.Module, Record]:
    """Distil ``teacher`` into a copy of ``student`` (through ``assistant`` when given).

    Returns:
        The trained copy and a Record with accuracies of teacher, assistant and student.
    """
    student = copy.deepcopy(student)
    record = Record()
    details: dict[str, Any] = {}
    if teacher is not None:
        details["teacher_top1"] = evaluate(teacher, data.x_test, data.y_test)
    details["student_top1_before"] = evaluate(student, data.x_test, data.y_test)
    if assistant is not None:
        if teacher is None:
            raise ConfigError("distill: an assistant needs a teacher")
        objective = build_objective(assistant, teacher, cfg.loss, data.x_train[:2])
        assert cfg.assistant is not None
        details["assistant_train"] = fit(
            assistant, data, cfg.assistant.train, objective, progress=progress,
            label="assistant",
            checkpoint_dir=Path(checkpoint_dir) / "assistant" if checkpoint_dir else None)
        details["assistant_top1"] = evaluate(assistant, data.x_test, data.y_test)
        record.changed.append(f"assistant {cfg.assistant.model} distilled from the teacher: "
                              f"top-1 {details['assistant_top1']:.2%}")
        teacher = assistant
    objective = build_objective(student, teacher, cfg.loss, data.x_train[:2])
    details["student_train"] = fit(student, data, cfg.train, objective, progress=progress,
                                   label="distill", checkpoint_dir=checkpoint_dir)
    details["student_top1"] = evaluate(student, data.x_test, data.y_test)
    record.changed.append(f"student distilled for {details['student_train']['steps']} steps: "
                          f"top-1 {details['student_top1_before']:.2%} -> "
                          f"{details['student_top1']:.2%}")
    record.details = details
    return student, record


@register_stage(DistillStageConfig)
def distill(model: SlimModel, cfg: DistillStageConfig,
            ctx: StageContext) -> tuple[SlimModel, Record]:
    """Train a copy of ``model`` as a student of ``ctx.teacher`` (or ``cfg.teacher``), through
    ``cfg.assistant`` when given (see :func:`_distill`)."""
    from slimkit.io.loader import load_model, load_zoo

    teacher = ctx.teacher_module
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, data=ctx.data).module
    assistant = None
    if cfg.assistant is not None:
        name = cfg.assistant.model.removeprefix("zoo:")
        assistant = load_zoo(name, ctx.data, **cfg.assistant.kwargs).module
    module, record = _distill(model.module, teacher, ctx.data, cfg, assistant, ctx.progress,
                              checkpoint_dir=ctx.workdir)
    return model.copy(module), record
