"""Distillation as training: fine-tuning with a teacher, the ``distill`` stage, teacher assistants.

Distillation owns no loop: it builds an Objective and hands it to ``slimkit.train.fit``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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
from slimkit.distill.outputs import output_loss
from slimkit.io import batch as B
from slimkit.io.model import SlimModel, modes_kept, set_mode
from slimkit.measure.tasks import get_task
from slimkit.train.config import TrainConfig
from slimkit.train.loop import evaluate_data, fit
from slimkit.train.objective import default_objective


def _example(data: DataBundle) -> B.Inputs:
    """Two training samples as the model takes them, for the objective's dry run."""
    return data.head("train", 2)[0]


def _judged_name(model: SlimModel, x: B.Inputs) -> str | None:
    """The name of ``model``'s judged output: its ``output``, else its first output's (found
    with one eval-mode forward pass on ``x``), so that a teacher or an assistant loaded apart
    from the student is judged by its own output, not by the student's name for it."""
    if model.output is not None:
        return model.output
    module = model.module
    device = next(iter(module.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad(), modes_kept(module):
            set_mode(module, False)
            return next(iter(B.flatten(B.call(module, B.to(x, device)))), None)
    except (RuntimeError, ValueError, TypeError):
        return None  # the objective's dry run reports the failure, naming the model


def finetune(model: nn.Module, data: DataBundle, cfg: TrainConfig,
             teacher: nn.Module | None = None,
             after_step: Callable[[nn.Module], None] | None = None,
             progress: bool = False, label: str = "fine-tune",
             checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``model`` in place; with ``cfg.distill`` the loss distils from ``teacher``
    (the logits: both models' judged output, :func:`slimkit.io.batch.select`, trained as the
    data's task says: :mod:`slimkit.distill.outputs`).

    Raises:
        ConfigError: distillation asks for a teacher and none is given.
    """
    distill_cfg = getattr(cfg, "distill", None)
    objective = None
    if distill_cfg is not None:
        if distill_cfg.needs_teacher and teacher is None:
            raise ConfigError(f"{label}: distill needs a teacher model and none was given")
        objective = build_objective(model, teacher, distill_cfg, _example(data),
                                    task=data.task)
    elif data.task != "classification":
        objective = default_objective(data.task, teacher)
    return fit(model, data, cfg, objective=objective, after_step=after_step,
               checkpoint_dir=checkpoint_dir, progress=progress, label=label)


def _distill(student: nn.Module, teacher: nn.Module | None, data: DataBundle,
             cfg: DistillStageConfig, assistant: nn.Module | None = None,
             progress: bool = False, checkpoint_dir: str | Path | None = None,
             teacher_output: str | None = None, assistant_output: str | None = None,
             ) -> tuple[nn.Module, Record]:
    """Distil ``teacher`` into a copy of ``student`` (through ``assistant`` when given).

    ``teacher_output`` / ``assistant_output`` name the teacher's and the assistant's judged
    outputs (None: the student's, :func:`slimkit.io.batch.select`'s default).

    Returns:
        The trained copy and a Record with accuracies of teacher, assistant and student.
    """
    output_loss(data.task, cfg.loss, has_teacher=teacher is not None)  # refuse before any work
    student = copy.deepcopy(student)
    record = Record()
    details: dict[str, Any] = {}
    # Top-1 for classification, else the task's primary metric (perplexity, cosine...).
    metric = "top1" if data.task == "classification" else get_task(data.task).primary

    def test(m: nn.Module) -> float:
        return evaluate_data(m, data)

    def shown(value: float) -> str:
        return f"top-1 {value:.2%}" if metric == "top1" else f"{metric} {value:.4g}"

    if teacher is not None:
        with _judged(teacher_output):
            details[f"teacher_{metric}"] = test(teacher)
    details[f"student_{metric}_before"] = test(student)
    if assistant is not None:
        if teacher is None:
            raise ConfigError("distill: an assistant needs a teacher")
        assert cfg.assistant is not None
        with _judged(assistant_output):  # the assistant is the student here
            objective = build_objective(assistant, teacher, cfg.loss, _example(data),
                                        teacher_output, task=data.task)
            details["assistant_train"] = fit(
                assistant, data, cfg.assistant.train, objective, progress=progress,
                label="assistant",
                checkpoint_dir=Path(checkpoint_dir) / "assistant" if checkpoint_dir else None)
            details[f"assistant_{metric}"] = test(assistant)
        record.changed.append(f"assistant {cfg.assistant.model} distilled from the teacher: "
                              f"{shown(details[f'assistant_{metric}'])}")
        teacher, teacher_output = assistant, assistant_output
    objective = build_objective(student, teacher, cfg.loss, _example(data), teacher_output,
                                task=data.task)
    details["student_train"] = fit(student, data, cfg.train, objective, progress=progress,
                                   label="distill", checkpoint_dir=checkpoint_dir)
    details[f"student_{metric}"] = test(student)
    record.changed.append(f"student distilled for {details['student_train']['steps']} steps: "
                          f"{shown(details[f'student_{metric}_before'])} -> "
                          f"{shown(details[f'student_{metric}']).split()[-1]}")
    record.details = details
    return student, record


def _judged(output: str | None) -> contextlib.AbstractContextManager[None]:
    """Judge ``output`` within the block (None: keep the judged output as it is)."""
    return B.judging(output) if output is not None else contextlib.nullcontext()


@register_stage(DistillStageConfig)
def distill(model: SlimModel, cfg: DistillStageConfig,
            ctx: StageContext) -> tuple[SlimModel, Record]:
    """Train a copy of ``model`` as a student of ``ctx.teacher`` (or ``cfg.teacher``), through
    ``cfg.assistant`` when given (see :func:`_distill`). Logit KD compares each model's judged
    output (its ``SlimModel.output``, else its first)."""
    from slimkit.io.loader import load_model, load_zoo

    teacher = ctx.teacher_module
    teacher_output = None if ctx.teacher is None else ctx.teacher.output
    if cfg.teacher is not None:
        loaded = load_model(cfg.teacher, data=ctx.data)
        teacher, teacher_output = loaded.module, _judged_name(loaded, _example(ctx.data))
    assistant, assistant_output = None, None
    if cfg.assistant is not None:
        name = cfg.assistant.model.removeprefix("zoo:")
        built = load_zoo(name, ctx.data, **cfg.assistant.kwargs)
        assistant, assistant_output = built.module, _judged_name(built, _example(ctx.data))
    module, record = _distill(model.module, teacher, ctx.data, cfg, assistant, ctx.progress,
                              checkpoint_dir=ctx.workdir, teacher_output=teacher_output,
                              assistant_output=assistant_output)
    return model.copy(module), record
