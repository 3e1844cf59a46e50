"""Registers the ``encode`` stage kind (weight sharing + entropy coding; composition only)."""

from __future__ import annotations

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.encode.config import EncodeConfig
from slimkit.encode.stage import encode
from slimkit.io.model import SlimModel
from slimkit.pipeline.stages import StageContext, register_stage


@register_stage(EncodeConfig)
def _encode(model: SlimModel, cfg: EncodeConfig, ctx: StageContext) -> tuple[SlimModel, Record]:
    if cfg.finetune is not None and ctx.data is None:
        raise ConfigError("stage encode: finetune needs training data (give --data)")
    return encode(model, cfg, ctx.data, teacher=ctx.teacher.module, progress=ctx.progress)
