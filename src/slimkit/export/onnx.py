"""Export to ONNX and check ONNX Runtime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slimkit.core.errors import ExportError
from slimkit.core.files import atomic_path
from slimkit.io.model import SlimModel, set_mode

OPSET = 17


def export_onnx(model: SlimModel, path: str | Path, opset: int = OPSET) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch axis, atomically.

    The TorchScript-based exporter is used for plain modules (fast, and it keeps Conv/Gemm as
    single nodes); graphs that came from ``torch.export`` go through the dynamo exporter.

    Raises:
        ExportError: naming the model and the first line of the exporter's complaint.
    """
    path = Path(path)
    set_mode(model.module, False)
    example = model.example_inputs(batch=2)
    is_exported = isinstance(model.module, torch.fx.GraphModule)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), _quiet_logs(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if is_exported:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model.module, example, str(tmp), dynamo=True, opset_version=18,
                                  dynamic_shapes=({0: batch},), external_data=False)
            else:
                torch.onnx.export(model.module, example, str(tmp), dynamo=False,
                                  opset_version=opset, input_names=["input"],
                                  output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of '{model.name}' failed: {first}") from exc
    return path


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The exporters log chatty warnings (missing torchvision ops...) that users cannot act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_parity(model: SlimModel, onnx_path: str | Path, inputs: tuple[torch.Tensor, ...],
                 atol: float = 1e-4, threads: int = 1) -> dict[str, Any]:
    """Run the same inputs through PyTorch and ONNX Runtime; report the max abs difference.

    Returns:
        ``{"max_abs_diff", "atol", "ok", "batch"}``; ``ok`` is False when the difference
        exceeds ``atol`` (callers decide whether that is fatal).
    """
    from slimkit.measure.latency import ort_session

    set_mode(model.module, False)
    with torch.inference_mode():
        ref = model.module(*inputs).float()
    session = ort_session(onnx_path, threads)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(session.run(None, feed)[0]).float()
    if got.shape != ref.shape:
        raise ExportError(f"ONNX output shape {tuple(got.shape)} differs from PyTorch "
                          f"{tuple(ref.shape)} for '{onnx_path}'")
    diff = float((got - ref).abs().max())
    return {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol, "batch": len(inputs[0])}
