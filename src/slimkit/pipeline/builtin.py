"""Registers the built-in techniques as stage kinds (composition only: no technique code here)."""

from __future__ import annotations

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.distill.run import DistillStageConfig, distill
from slimkit.io.model import SlimModel
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.prune.magnitude import MagnitudePruneConfig, magnitude_prune


@register_stage(MagnitudePruneConfig)
def _magnitude_prune(model: SlimModel, cfg: MagnitudePruneConfig,
                     ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = magnitude_prune(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                                     progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), record


@register_stage(DistillStageConfig)
def _distill(model: SlimModel, cfg: DistillStageConfig,
             ctx: StageContext) -> tuple[SlimModel, Record]:
    from slimkit.io.loader import load_model, load_zoo

    if ctx.data is None:
        raise ConfigError("stage distill needs training data (give --data)")
    teacher = ctx.teacher.module
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, data=ctx.data).module
    assistant = None
    if cfg.assistant is not None:
        name = cfg.assistant.model.removeprefix("zoo:")
        assistant = load_zoo(name, ctx.data, **cfg.assistant.kwargs).module
    module, record = distill(model.module, teacher, ctx.data, cfg, assistant, ctx.progress,
                             checkpoint_dir=ctx.workdir)
    return model.copy(module), record


# Technique packages that keep their stage adapters in their own modules.
from slimkit.pipeline import (  # noqa: E402, F401
    builtin_encode,
    builtin_lowrank,
    builtin_prune,
    builtin_quant,
    builtin_quant_qat,
    builtin_quant_wo,
    builtin_structured,
)
