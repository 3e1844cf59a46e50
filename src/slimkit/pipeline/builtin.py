"""Registers the built-in techniques as stage kinds (composition only: no technique code here)."""

from __future__ import annotations

from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.prune.magnitude import MagnitudePruneConfig, magnitude_prune


@register_stage(MagnitudePruneConfig)
def _magnitude_prune(model: SlimModel, cfg: MagnitudePruneConfig,
                     ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = magnitude_prune(model.module, cfg, ctx.data, progress=ctx.progress)
    return model.copy(module), record
