"""Registers the ``weight_only_quant`` and ``dynamic_quant`` stage kinds (composition only)."""

from __future__ import annotations

from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.io.transforms import record_transform
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.quant.dynamic import DynamicQuantConfig, dynamic_quant
from slimkit.quant.weight_only import WeightOnlyConfig, weight_only_quant


@register_stage(WeightOnlyConfig)
def _weight_only_quant(model: SlimModel, cfg: WeightOnlyConfig,
                       ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = weight_only_quant(model.module, cfg, ctx.data,
                                       example_inputs=model.example_inputs(2))
    out = model.copy(module)
    if record.details["layers"]:
        # layers became packed ones: the artifact rebuilds them by replaying the plan.
        record_transform(out, "weight_only_quant", "slimkit.quant.weight_only",
                         record.details["plan"])
    return out, record


@register_stage(DynamicQuantConfig)
def _dynamic_quant(model: SlimModel, cfg: DynamicQuantConfig,
                   ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = dynamic_quant(model.module, cfg, ctx.data,
                                   example_inputs=model.example_inputs(2))
    out = model.copy(module)
    if record.details["layers"]:
        record_transform(out, "dynamic_quant", "slimkit.quant.dynamic", record.details["plan"])
    return out, record
