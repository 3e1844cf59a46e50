"""Export an early-exit model as a chain of ONNX steps that stop in ONNX Runtime, and check
every exit against PyTorch.

``export_exit_onnx(model, folder)`` writes ``step_<k>.onnx`` (segment ``k`` with its exit
head and the confidence, see :mod:`slimkit.exit.runner`), ``early_exit.json`` and the runner's
own source (``runner.py``), so the folder runs with numpy and onnxruntime alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimkit.core.errors import ConfigError, ExportError
from slimkit.core.files import atomic_dir
from slimkit.exit.model import EarlyExitModel, confidence, exit_index
from slimkit.exit.runner import SPEC, EarlyExitRunner
from slimkit.io import batch as B
from slimkit.io.model import SlimModel, modes_kept, set_mode

OPSET = 17


class _Step(nn.Module):
    """Segment ``k`` (+ its exit head and confidence) as one exportable module.

    A state value that is None (a transformers model's absent attention mask) is no ONNX
    input or output: ``none_in`` are the positions of the segment's state where None goes
    back in, ``none_out`` those of its next state that are left out.
    """

    def __init__(self, model: EarlyExitModel, k: int, none_in: list[int]) -> None:
        super().__init__()
        self.segment = model.segments()[k].module
        self.last = k == len(model.heads)
        self.head = None if self.last else model.heads[k]
        self.how = model.plan["confidence"]
        self.judged = model.judged
        self.none_in = none_in
        self.none_out: list[int] = []

    def forward(self, *live: Tensor) -> Any:
        state = step_state(self, list(live))
        if self.last:
            return self.judged(self.segment(*state))
        nxt, feat = self.segment(*state)
        logits = self.head(feat)
        kept = [v for i, v in enumerate(nxt) if i not in self.none_out]
        return (*kept, logits, confidence(logits, self.how))


def _traced_next(step: _Step, state: list[Tensor]) -> tuple[list[int], list[Tensor]]:
    """The step's next state *as exported*: which of its values are None under tracing
    (where a transformers model builds its attention mask even when no row is padded, and
    eagerly it may not), and the others' values, the next step's example inputs."""
    probe = _Probe(step)
    with warnings.catch_warnings(), torch.no_grad(), modes_kept(probe):
        warnings.simplefilter("ignore")
        # The tracer the ONNX export uses (no submodule boundaries recorded).
        _, outs = torch.jit._get_trace_graph(probe.eval(), tuple(state))
    return probe.found, list(outs) if isinstance(outs, tuple | list) else [outs]


class _Probe(nn.Module):
    """The step's segment, noting which next-state values are None when traced."""

    def __init__(self, step: _Step) -> None:
        super().__init__()
        self.step = step
        self.found: list[int] = []

    def forward(self, *live: Tensor) -> tuple[Tensor, ...]:
        nxt = self.step.segment(*step_state(self.step, list(live)))[0]
        self.found = [i for i, v in enumerate(nxt) if v is None]
        return tuple(v for v in nxt if v is not None)


def step_state(step: _Step, live: list[Tensor]) -> list[Tensor | None]:
    """The segment's full state from the step's inputs (None back where it was)."""
    values = iter(live)
    return [None if i in step.none_in else next(values)
            for i in range(len(live) + len(step.none_in))]


def _names(k: int, n: int) -> list[str]:
    return [f"state{k}_{i}" for i in range(n)]


def export_exit_onnx(model: SlimModel, folder: str | Path, overwrite: bool = False,
                     opset: int = OPSET) -> Path:
    """Write ``model`` (an early-exit model) as a chain of ONNX steps plus the runner.

    Raises:
        ConfigError: the model has no exits (it was not made by ``early_exit``).
        ExportError: a step fails to export (naming it).
        OutputExistsError: ``folder`` exists and ``overwrite`` is False.
    """
    ee = model.module
    if not isinstance(ee, EarlyExitModel):
        raise ConfigError(f"'{model.name}' has no exits: export_exit_onnx takes a model made "
                          "by the early_exit stage; use export_onnx for a static model")
    from slimkit.export.qdq import export_module, has_quant_layers, postprocess_qdq

    quantized = has_quant_layers(ee)
    if quantized:  # QuantLayers export as their QDQ twins, as export_onnx writes them
        ee = export_module(ee)
    set_mode(ee, False)
    x = model.example_inputs(batch=2)
    in_names = [s.name for s in model.input_specs]
    segments = ee.segments()
    steps, state, none_in = [], list(B.leaves(x)), []
    # The exporter restores the mode a module had before; a fresh _Step is in training mode,
    # and restoring that would switch the backbone's shared layers to training: eval first.
    with atomic_dir(Path(folder), overwrite=overwrite) as tmp, modes_kept(ee):
        for k in range(len(segments)):
            step = _Step(ee, k, none_in).eval()
            names = in_names if k == 0 else _names(k, len(state))
            last = k == len(segments) - 1
            nxt: list[Tensor] = []
            if not last:
                step.none_out, nxt = _traced_next(step, state)
            n_out = len(nxt)
            outs = ["logits"] if last else [*_names(k + 1, n_out), "exit_logits",
                                             "confidence"]
            _export(step, tuple(state), tmp / f"step_{k}.onnx", names, outs, opset)
            if quantized:
                postprocess_qdq(tmp / f"step_{k}.onnx")
            steps.append({"file": f"step_{k}.onnx", "inputs": names, "outputs": outs})
            state, none_in = nxt, step.none_out
        spec = {"format": "slimkit-early-exit-onnx", "version": 1, "steps": steps,
                "thresholds": ee.thresholds, "exits": ee.blocks,
                "confidence": ee.plan["confidence"]}
        (tmp / SPEC).write_text(json.dumps(spec, indent=2), encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name("runner.py"), tmp / "runner.py")
    return Path(folder)


def _export(step: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], opset: int) -> None:
    axes = {n: {0: "batch"} for n in [*inputs, *outputs]}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(step, args, str(path), dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export of early-exit step '{path.name}' failed: {first}"
                          ) from exc


def check_exit_parity(model: SlimModel, folder: str | Path, inputs: Any,
                      atol: float = 1e-4) -> dict[str, Any]:
    """Run ``inputs`` through PyTorch and the ONNX chain: every exit's logits (the head on
    each step, for all rows), the exit each sample takes, and the dynamic output.

    Returns:
        ``{"ok", "atol", "exit_max_abs_diff": [per exit and final], "same_exits",
        "max_abs_diff"}``.
    """
    ee = model.module
    runner = EarlyExitRunner(folder)
    feed = {n: t.numpy() for n, t in zip(runner.input_names, B.leaves(inputs), strict=True)}
    with torch.inference_mode():
        exits, final = B.call(ee.exit_outputs, inputs)
        ref_where = B.call(lambda *a, **k: exit_index(ee, *a, **k), inputs)
        ref_out = B.call(ee, inputs)
    diffs = []
    state: list[Any] = [feed[n] for n in runner.input_names]
    for k, session in enumerate(runner.sessions):
        res = session.run(None, dict(zip(runner.spec["steps"][k]["inputs"], state, strict=True)))
        got = res[-2] if k < len(exits) else res[0]
        ref = exits[k] if k < len(exits) else final
        diffs.append(float(np.abs(got - ref.numpy()).max()))
        state = res[:-2]
    out, where = runner.run(feed)
    same = bool((torch.from_numpy(where) == ref_where).all())
    total = float(np.abs(out - ref_out.numpy()).max())
    return {"ok": same and max(diffs) <= atol and total <= atol, "atol": atol,
            "exit_max_abs_diff": diffs, "same_exits": same, "max_abs_diff": total}
