"""An ONNX file as a callable model, for inspect, bench and eval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimkit.core.errors import ModelLoadError

_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}


@dataclass
class OnnxModel:
    """An ONNX Runtime session that maps a tensor batch to a tensor of outputs."""

    path: Path
    session: Any
    input_shape: tuple[int, ...]
    input_dtype: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        return torch.from_numpy(np.asarray(self.session.run(None, {name: x.numpy()})[0]))

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, *self.input_shape)
        if self.input_dtype.startswith("int"):
            return (torch.randint(0, 2, shape, generator=gen),)
        return (torch.randn(shape, generator=gen),)


def ort_options(threads: int, optimized_path: str | Path | None = None) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads, sequential execution, all
    graph optimizations, warnings off; with ``optimized_path``, the optimized graph is saved
    there when a session opens (to see which kernels ORT chose)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def ort_session(path: str | Path, threads: int, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with a fixed thread count (recorded by the caller); see
    :func:`ort_options`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=ort_options(threads, optimized_path),
                                providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path, threads: int = 1) -> OnnxModel:
    """Open an ONNX file with ONNX Runtime (validating it with the ONNX checker first)."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
        session = ort_session(path, threads)
    except Exception as exc:  # onnx and onnxruntime raise many types for a bad file
        raise ModelLoadError(f"'{path}' is not a valid ONNX model: {exc}") from None
    inp = session.get_inputs()[0]
    dims = inp.shape[1:]
    if not all(isinstance(d, int) for d in dims):
        raise ModelLoadError(f"'{path}': input '{inp.name}' has symbolic non-batch dims {dims}")
    return OnnxModel(path=path, session=session, input_shape=tuple(dims),
                     input_dtype=_ONNX_DTYPES.get(inp.type, "float32"))
