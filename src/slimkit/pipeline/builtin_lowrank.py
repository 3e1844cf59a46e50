"""Registers the ``lowrank`` stage kind (composition only: no technique code here)."""

from __future__ import annotations

from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.run import lowrank
from slimkit.pipeline.stages import StageContext, register_stage


@register_stage(LowRankConfig)
def _lowrank(model: SlimModel, cfg: LowRankConfig,
             ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = lowrank(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                             progress=ctx.progress, example_inputs=model.example_inputs(1))
    out = model.copy(module)
    if record.details["layers"]:
        # The architecture changed: a zoo spec would rebuild the dense layers, so the artifact
        # must store the factorized graph instead (io saves a .pt2 graph when arch is None).
        out.arch = None
    return out, record
