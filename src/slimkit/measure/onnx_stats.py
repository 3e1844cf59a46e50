"""What an ONNX file holds: parameters in initializers and the op histogram."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


def onnx_stats(path: str | Path) -> dict:
    """Params and non-zero params (from initializers), and node counts per op type."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    params = nonzero = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            params += arr.size
            nonzero += int(np.count_nonzero(arr))
    ops = Counter(node.op_type for node in model.graph.node)
    return {"params": params, "nonzero_params": nonzero, "ops": dict(sorted(ops.items())),
            "opset": model.opset_import[0].version if model.opset_import else None}
