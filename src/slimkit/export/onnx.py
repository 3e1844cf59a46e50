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
from slimkit.io import batch as B
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
            input_names, output_names, axes = onnx_names(model, example)
            if is_exported:
                dims = {n: torch.export.Dim(n, min=1, max=4096)
                        for a in axes.values() for n in a.values()}
                shapes = {k: {i: dims[n] for i, n in a.items()} for k, a in axes.items()
                          if k in input_names}
                args, kwargs = ((), example) if isinstance(example, dict) else (example, None)
                torch.onnx.export(model.module, args, str(tmp), kwargs=kwargs, dynamo=True,
                                  opset_version=18, external_data=False,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_shapes=shapes if kwargs else tuple(shapes.values()))
            else:
                args = example
                if isinstance(example, dict):  # the named inputs alone become graph inputs
                    module = _Keywords(module, input_names)
                    args = tuple(example[n] for n in input_names)
                torch.onnx.export(module, args, str(tmp), dynamo=False,
                                  opset_version=opset, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes)
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


class _Keywords(torch.nn.Module):
    """Positional inputs passed on as keywords: the graph takes exactly the named inputs (a
    forward's other arguments, as GPT-2's ``logits_to_keep``, keep their defaults)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.module(**dict(zip(self.names, tensors, strict=True)))


def onnx_names(model: SlimModel, example: Any) -> tuple[list[str], list[str], dict]:
    """ONNX input and output names and dynamic axes for ``model``.

    Inputs are named as the forward takes them (``input_ids``; ``input`` for one positional
    tensor); outputs as :func:`slimkit.io.batch.flatten` names them (``output``,
    ``logits``...). The batch axis and the inputs' named dynamic axes stay dynamic.
    """
    specs = {s.name: s for s in model.input_specs}
    names = list(specs)
    with torch.inference_mode():
        outputs = list(B.flatten(B.call(model.module, example)))
    axes = {n: {0: "batch", **specs[n].dynamic} for n in names}
    axes.update({n: {0: "batch"} for n in outputs})
    return names, outputs, axes


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


def _has_weight_only_quant(module: torch.nn.Module) -> bool:
    """Quantized weights with float activations: ONNX Runtime (1.2x, default settings) fuses
    ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` at ``accuracy_level`` 4, which
    quantizes the activations per block at run time; such layers compare as dynamic ones."""
    from slimkit.quant.modules import QuantLayer

    return any(isinstance(m, QuantLayer) and m.weight_fq is not None and m.input_fq is None
               for m in module.modules())


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


def _grid_rounding(r: torch.Tensor) -> float:
    """How far float32 rounding can move a difference of whole output steps.

    Both runtimes write ``(code - zero_point) * scale`` in float32, each rounded to half an
    ulp of the value, and the difference is rounded once more: two codes apart can measure
    ``2 * step`` plus a few float32 ulps of the largest output (seen as ``2 * step + 7e-8``
    failing). This is float32 representation error only, not a looser code tolerance.
    """
    if not r.numel():
        return 0.0
    return 4 * float(torch.finfo(torch.float32).eps) * float(r.abs().max())


def check_parity(model: SlimModel, onnx_path: str | Path, inputs: Any,
                 atol: float = 1e-4, threads: int = 1) -> dict[str, Any]:
    """Run the same inputs through PyTorch and ONNX Runtime; compare every output.

    ``inputs`` is a batch as the model takes it (a tensor, a tuple, a dict; see
    :func:`slimkit.io.batch.call`); ONNX Runtime is fed by input name, and every output is
    compared by name (``outputs`` in the result holds each one's max abs difference).

    A quantized model's output is on a grid of step ``s``: the runtime's integer kernels may
    round a value on the other side of a rounding boundary than the float simulation, so the
    tolerance is at least two output steps there (``quant_step`` in the result). A dynamically
    quantized model rounds its activations at run time: a last-bit difference upstream (ONNX
    Runtime's LayerNorm against PyTorch's) can move one code, so the tolerance there is
    ``DYNAMIC_RTOL`` of each output's largest magnitude (``rtol``); the same holds for
    weight-only quantized layers, whose activations ONNX Runtime quantizes at run time
    (``MatMulNBits`` fusion), and for the outputs of a quantized model other than the first,
    which no output step bounds.
    ``exact_fraction`` says how many outputs match to 1e-6.

    Returns:
        ``{"max_abs_diff", "atol", "ok", "batch", "outputs"}``; ``ok`` is False when an
        output differs by more than its tolerance (callers decide whether that is fatal).

    Raises:
        ExportError: the ONNX file lacks an input or output the model has, or an output's
            shape differs.
    """
    from slimkit.io.onnx_model import ort_session

    set_mode(model.module, False)
    with torch.inference_mode():
        ref = {k: v.float() for k, v in B.flatten(B.call(model.module, inputs)).items()}
    session = ort_session(onnx_path, threads)
    given = dict(zip(B.names(inputs), B.leaves(inputs), strict=True))
    feed = {}
    for i in session.get_inputs():
        if i.name not in given:
            raise ExportError(f"'{onnx_path}' takes an input '{i.name}' the batch lacks "
                              f"(it has {', '.join(given)})")
        feed[i.name] = given[i.name].numpy()
    onnx_names_ = [o.name for o in session.get_outputs()]
    if len(onnx_names_) != len(ref):
        raise ExportError(f"'{onnx_path}' has {len(onnx_names_)} outputs, PyTorch "
                          f"{len(ref)} ({', '.join(ref)})")
    got = dict(zip(ref, (torch.from_numpy(a).float() for a in session.run(None, feed)),
                   strict=True))
    step = output_step(model.module)
    dynamic = step is None and (_has_dynamic_quant(model.module)
                                or _has_weight_only_quant(model.module))
    diffs, ok, exact, worst_atol = {}, True, [], atol
    first = next(iter(ref), None)
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise ExportError(f"ONNX output '{name}' has shape {tuple(g.shape)}, PyTorch "
                              f"{tuple(r.shape)}, for '{onnx_path}'")
        diffs[name] = float((g - r).abs().max()) if r.numel() else 0.0
        # The step rule holds for the output the last quantized layer writes (the first);
        # other outputs of a quantized model take the relative rule of dynamic quantization.
        relative = (dynamic or (step is not None and name != first)) and r.numel()
        tol = (max(atol, 2 * step + _grid_rounding(r)) if step is not None and name == first
               else max(atol, DYNAMIC_RTOL * float(r.abs().max())) if relative else atol)
        ok &= diffs[name] <= tol
        worst_atol = max(worst_atol, tol)
        exact.append(((g - r).abs() <= 1e-6).float().flatten())
    out = {"max_abs_diff": max(diffs.values(), default=0.0), "atol": worst_atol, "ok": ok,
           "batch": B.size(inputs), "outputs": diffs}
    if step is not None or dynamic:
        out["exact_fraction"] = float(torch.cat(exact).mean()) if exact else 1.0
        out.update({"quant_step": step} if step is not None else {"rtol": DYNAMIC_RTOL})
    return out
