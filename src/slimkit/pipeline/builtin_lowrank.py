"""Registers the ``lowrank`` stage kind (composition only: no technique code here)."""

from __future__ import annotations

from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.io.transforms import record_transform
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
        # The architecture changed: the artifact rebuilds it by replaying the plan.
        record_transform(out, "lowrank", "slimkit.lowrank.plan", record.details["plan"])
    return out, record
