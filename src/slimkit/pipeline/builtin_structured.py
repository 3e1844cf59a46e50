"""Registers the ``structured_prune`` stage kind (composition only: no technique code here)."""

from __future__ import annotations

from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.io.transforms import record_transform
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.prune.structured import StructuredPruneConfig, changes_structure, structured_prune


@register_stage(StructuredPruneConfig)
def _structured_prune(model: SlimModel, cfg: StructuredPruneConfig,
                      ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = structured_prune(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                                      progress=ctx.progress, checkpoint_dir=ctx.workdir,
                                      example_inputs=model.example_inputs(2))
    out = model.copy(module)
    for plan in record.details["plans"]:
        if changes_structure(plan):
            # The architecture changed: the artifact rebuilds it by replaying each plan.
            record_transform(out, "structured_prune", "slimkit.prune.structured", plan)
    return out, record
