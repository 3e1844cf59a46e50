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

from slimkit.core.errors import ExportError, OutputExistsError
from slimkit.core.files import atomic_path, ensure_absent
from slimkit.export.fuse import fuse_file
from slimkit.export.qdq import export_module, has_quant_layers, output_step, postprocess_qdq
from slimkit.io.model import SlimModel, set_mode

OPSET = 17
#: Parity tolerance of dynamically quantized models, relative to the output's largest magnitude.
DYNAMIC_RTOL = 0.01


def export_onnx(model: SlimModel, path: str | Path, opset: int = OPSET) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch axis, atomically.

    The TorchScript-based exporter is used for plain modules (fast, and it keeps Conv/Gemm as
    single nodes); graphs that came from ``torch.export`` go through the dynamo exporter.
    Models holding QuantLayers are written in ONNX Runtime's QDQ form with int8 weight
    initializers (:mod:`slimkit.export.qdq`); dynamically quantized linears that read the same
    tensor share one integer matmul (:mod:`slimkit.export.fuse`).

    Raises:
        ExportError: naming the model and the first line of the exporter's complaint.
    """
    path = Path(path)
    set_mode(model.module, False)
    example = model.example_inputs(batch=2)
    is_exported = isinstance(model.module, torch.fx.GraphModule)
    module = model.module
    quantized = not is_exported and has_quant_layers(module)
    if quantized:
        module = set_mode(export_module(module), False)
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), _quiet_logs(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if is_exported:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model.module, example, str(tmp), dynamo=True, opset_version=18,
                                  dynamic_shapes=({0: batch},), external_data=False)
            else:
                torch.onnx.export(module, example, str(tmp), dynamo=False,
                                  opset_version=opset, input_names=["input"],
                                  output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
                if quantized:
                    postprocess_qdq(tmp)
                if _has_dynamic_quant(module):
                    fuse_file(tmp)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of '{model.name}' failed: {first}") from exc
    return path


def export_checked(model: SlimModel, path: str | Path, *, overwrite: bool = False,
                   atol: float = 1e-4, batch: int = 4, opset: int = OPSET) -> dict[str, Any]:
    """Export ``model`` to ONNX and check it against PyTorch before it replaces ``path``.

    The file is written beside ``path`` and moved into place only after the parity check
    passed: when the export or the check fails, a previous ``path`` is left byte for byte.

    Args:
        overwrite: replace an existing ``path`` (once every check passed).
        atol: parity tolerance (see :func:`check_parity`).
        batch: rows of the model's example inputs used for the check.

    Returns:
        ``{"onnx": path, "bytes": size, "parity": check_parity's result}``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False, or is no regular
            file (before any work).
        ExportError: the export failed, or ONNX Runtime differs from PyTorch by more than
            the tolerance.

    Example:
        >>> export_checked(model, "model.onnx", overwrite=True)["parity"]["ok"]  # doctest: +SKIP
        True
    """
    path = Path(path)
    ensure_absent(path, overwrite)
    if path.exists() and not path.is_file():  # renaming onto a device would replace it
        raise OutputExistsError(f"output '{path}' is not a regular file (a device, pipe, "
                                "folder or socket?); choose another path")
    with atomic_path(path) as tmp:
        export_onnx(model, tmp, opset)
        parity = check_parity(model, tmp, model.example_inputs(batch), atol)
        if not parity["ok"]:
            kept = f"'{path}' was left as it was" if path.exists() else "nothing was written"
            raise ExportError(f"the ONNX export of '{model.name}' differs from PyTorch by "
                              f"{parity['max_abs_diff']:.2e} (> {parity['atol']:g}); {kept}")
        size = tmp.stat().st_size
    return {"onnx": str(path), "bytes": size, "parity": parity}


def _has_dynamic_quant(module: torch.nn.Module) -> bool:
    from slimkit.quant.dynamic_linear import DynamicQuantLinear

    return any(isinstance(m, DynamicQuantLinear) for m in module.modules())


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

    A quantized model's output is on a grid of step ``s``: the runtime's integer kernels may
    round a value on the other side of a rounding boundary than the float simulation, so the
    tolerance is at least two output steps there (``quant_step`` in the result). A dynamically
    quantized model rounds its activations at run time: a last-bit difference upstream (ONNX
    Runtime's LayerNorm against PyTorch's) can move one code, so the tolerance there is
    ``DYNAMIC_RTOL`` of the output's largest magnitude (``rtol``); ``exact_fraction`` says how
    many outputs match to 1e-6.

    Returns:
        ``{"max_abs_diff", "atol", "ok", "batch"}``; ``ok`` is False when the difference
        exceeds ``atol`` (callers decide whether that is fatal).
    """
    from slimkit.io.onnx_model import ort_session

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
    out = {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol, "batch": len(inputs[0])}
    step = output_step(model.module)
    exact = float(((got - ref).abs() <= 1e-6).float().mean())
    if step is not None:
        atol = max(atol, 2 * step)
        out.update({"quant_step": step, "atol": atol, "ok": diff <= atol, "exact_fraction": exact})
    elif _has_dynamic_quant(model.module):
        atol = max(atol, DYNAMIC_RTOL * float(ref.abs().max()))
        out.update({"rtol": DYNAMIC_RTOL, "atol": atol, "ok": diff <= atol,
                    "exact_fraction": exact})
    return out
