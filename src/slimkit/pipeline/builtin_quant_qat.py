"""Registers the ``qat`` and ``mixed_precision`` stage kinds (composition only)."""

from __future__ import annotations

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.io.transforms import record_transform
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.quant.mixed import MixedPrecisionConfig, mixed_precision
from slimkit.quant.qat import QatConfig, qat


def _record_quant_transforms(model: SlimModel, record: Record) -> None:
    """Let the artifact rebuild the quantized layers (plain frozen and bit-packed ones)."""
    if record.details.get("plan"):
        record_transform(model, "quant_layers", "slimkit.quant.plan", record.details["plan"])
    if record.details.get("packed_plan"):
        record_transform(model, "packed_quant", "slimkit.quant.extreme",
                         record.details["packed_plan"])


@register_stage(QatConfig)
def _qat(model: SlimModel, cfg: QatConfig, ctx: StageContext) -> tuple[SlimModel, Record]:
    if ctx.data is None:
        raise ConfigError("stage qat needs training data (give --data)")
    module, record = qat(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                         progress=ctx.progress, checkpoint_dir=ctx.workdir)
    out = model.copy(module)
    _record_quant_transforms(out, record)
    return out, record


@register_stage(MixedPrecisionConfig)
def _mixed(model: SlimModel, cfg: MixedPrecisionConfig,
           ctx: StageContext) -> tuple[SlimModel, Record]:
    if ctx.data is None:
        raise ConfigError("stage mixed_precision needs data (give --data)")
    module, record = mixed_precision(model.module, cfg, ctx.data)
    out = model.copy(module)
    _record_quant_transforms(out, record)
    return out, record
