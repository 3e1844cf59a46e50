"""Registers the ``ptq`` stage kind (composition only: no technique code here)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from slimkit.core.errors import SlimkitError
from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.io.transforms import record_transform
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.quant.ptq import PtqConfig, ptq


def _int8_ops(model: SlimModel, record: Record) -> None:
    """Which nodes ONNX Runtime runs as integer kernels (recorded; float fallbacks flagged)."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.qdq import int8_ops

    try:
        with tempfile.TemporaryDirectory() as tmp:
            record.details["ort_int8"] = int8_ops(export_onnx(model, Path(tmp) / "q.onnx"))
    except (SlimkitError, ImportError) as exc:
        record.skipped.append({"what": "ONNX Runtime integer-kernel check", "why": str(exc)})
        return
    for node in record.details["ort_int8"]["float_fallbacks"]:
        record.skipped.append({"what": node, "why": "ONNX Runtime runs it in float between "
                               "DequantizeLinear/QuantizeLinear (slower than float alone)"})


@register_stage(PtqConfig)
def _ptq(model: SlimModel, cfg: PtqConfig, ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = ptq(model.module, cfg, ctx.data)
    out = model.copy(module)
    # The structure changed (BatchNorm folded, layers wrapped): artifacts replay both.
    if record.details["bn_pairs"]:
        record_transform(out, "bn_fold", "slimkit.quant.fold",
                         {"pairs": [list(p) for p in record.details["bn_pairs"]]})
    record_transform(out, "quant_layers", "slimkit.quant.plan", record.details["plan"])
    _int8_ops(out, record)
    return out, record
