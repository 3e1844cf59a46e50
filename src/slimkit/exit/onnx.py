"""Export an early-exit model as a chain of ONNX steps that stop in ONNX Runtime, and check
every exit against PyTorch.

``export_exit_onnx(model, folder)`` writes ``step_<k>.onnx`` (segment ``k`` with its exit
head and the confidence, see :mod:`slimkit.exit.runner`), ``early_exit.onnx`` (the steps
nested under ``If`` nodes: one call that stops, what a batch of one runs), ``early_exit.json``
and the runner's own source (``runner.py``), so the folder runs with numpy and onnxruntime
alone.
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
GRAPH = "early_exit.onnx"  # the steps nested under If nodes: one call per input


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
        n_exits = len(segments) - 1
        compose_if_graph(tmp, steps, ee.thresholds or [None] * n_exits)
        spec = {"format": "slimkit-early-exit-onnx", "version": 1, "steps": steps,
                "graph": GRAPH,
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

    Then each sample alone through the If graph (``early_exit.onnx``): its exit and logits.

    Returns:
        ``{"ok", "atol", "exit_max_abs_diff": [per exit and final], "same_exits",
        "max_abs_diff", "graph_same_exits", "graph_max_abs_diff"}``.
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
    # The If graph, sample by sample (a batch of one stops at the sample's own exit).
    rows = [runner.graph.run(None, {n: v[i:i + 1] for n, v in feed.items()})
            for i in range(len(where))] if runner.graph is not None else []
    graph_same = all(int(k) == int(w) for (_, k), w in zip(rows, ref_where, strict=False))
    graph_diff = max((float(np.abs(o - ref_out[i:i + 1].numpy()).max())
                      for i, (o, _) in enumerate(rows)), default=0.0)
    ok = same and graph_same and max(diffs) <= atol and max(total, graph_diff) <= atol
    return {"ok": ok, "atol": atol, "exit_max_abs_diff": diffs, "same_exits": same,
            "max_abs_diff": total, "graph_same_exits": graph_same,
            "graph_max_abs_diff": graph_diff}


def compose_if_graph(folder: Path, steps: list[dict[str, Any]],
                     thresholds: list[float | None]) -> Path:
    """Nest the chain's steps into one ONNX model that stops with ``If`` nodes: after each
    open exit, ``If(min(confidence) >= threshold)`` returns that exit's logits, else runs the
    rest. One ONNX Runtime call per input, no state copied out and back in: the chain's
    per-call cost is gone. A batch stops at an exit only when every row in it is confident
    there (for a batch of one, each sample's own exit); outputs ``logits`` and ``exit`` (int64
    scalar: the exit taken, ``len(exits)`` for the final head). Dead nodes (closed exits'
    heads) are removed.
    """
    import onnx
    from onnx import TensorProto, helper

    models = [onnx.load(str(folder / s["file"])) for s in steps]
    last = len(steps) - 1
    logits_type = models[-1].graph.output[0].type

    def renamed(k: int) -> onnx.GraphProto:
        """Step ``k``'s graph with every value named ``s<k>/...``, except its inputs, named
        as the previous step's outputs they are (the model's own inputs for step 0)."""
        g = onnx.GraphProto()
        g.CopyFrom(models[k].graph)
        inputs = {i.name for i in g.input}

        def name(v: str) -> str:
            if not v:
                return v
            if v in inputs:
                return v if k == 0 else f"s{k - 1}/{v}"
            return f"s{k}/{v}"

        _rename(g, name, f"s{k}/")
        return g

    def build(k: int, nodes: list, inits: list) -> tuple[str, str]:
        g = renamed(k)
        nodes.extend(g.node)
        inits.extend(g.initializer)
        if k == last:
            return g.output[0].name, _const(nodes, f"s{k}/exit", k)
        if thresholds[k] is None:
            return build(k + 1, nodes, inits)
        logits, conf = g.output[-2].name, g.output[-1].name
        nodes.append(helper.make_node("ReduceMin", [conf], [f"s{k}/min_conf"], keepdims=0))
        nodes.append(helper.make_node("Constant", [], [f"s{k}/threshold"],
                                      value=helper.make_tensor("t", TensorProto.FLOAT, [],
                                                               [float(thresholds[k])])))
        nodes.append(helper.make_node("GreaterOrEqual", [f"s{k}/min_conf", f"s{k}/threshold"],
                                      [f"s{k}/stop"]))
        then_nodes = [helper.make_node("Identity", [logits], [f"then{k}/logits"])]
        then = helper.make_graph(then_nodes, f"exit{k}", [],
                                 _outs(f"then{k}/logits", _const(then_nodes, f"then{k}/exit", k),
                                       logits_type))
        rest_nodes: list = []
        rest_inits: list = []
        rl, re_ = build(k + 1, rest_nodes, rest_inits)
        rest_nodes += [helper.make_node("Identity", [rl], [f"else{k}/logits"]),
                       helper.make_node("Identity", [re_], [f"else{k}/exit"])]
        rest = helper.make_graph(rest_nodes, f"after_exit{k}", [],
                                 _outs(f"else{k}/logits", f"else{k}/exit", logits_type),
                                 initializer=rest_inits)
        nodes.append(helper.make_node("If", [f"s{k}/stop"], [f"if{k}/logits", f"if{k}/exit"],
                                      then_branch=then, else_branch=rest))
        return f"if{k}/logits", f"if{k}/exit"

    nodes: list = []
    inits: list = []
    logits, where = build(0, nodes, inits)
    nodes += [helper.make_node("Identity", [logits], ["logits"]),
              helper.make_node("Identity", [where], ["exit"])]
    graph = helper.make_graph(nodes, "early_exit", list(models[0].graph.input),
                              _outs("logits", "exit", logits_type), initializer=inits)
    model = helper.make_model(graph, opset_imports=list(models[0].opset_import),
                              ir_version=models[0].ir_version)
    _drop_dead(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / GRAPH))
    return folder / GRAPH


def _rename(g: Any, name: Any, prefix: str) -> None:
    """Rename every value of graph ``g`` (and of its subgraphs) by ``name(old)``, and put
    ``prefix`` before every node's name."""
    from onnx import AttributeProto

    for v in [*g.input, *g.output, *g.value_info]:
        v.name = name(v.name)
    for t in g.initializer:
        t.name = name(t.name)
    for node in g.node:
        node.input[:] = [name(v) for v in node.input]
        node.output[:] = [name(v) for v in node.output]
        node.name = prefix + (node.name or node.output[0])
        for a in node.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else a.graphs:
                _rename(sub, name, prefix)


def _const(nodes: list, name: str, k: int) -> str:
    from onnx import TensorProto, helper

    nodes.append(helper.make_node("Constant", [], [name],
                                  value=helper.make_tensor("k", TensorProto.INT64, [], [k])))
    return name


def _outs(logits: str, where: str, logits_type: Any) -> list:
    from onnx import TensorProto, helper

    out = helper.make_value_info(logits, logits_type)
    return [out, helper.make_tensor_value_info(where, TensorProto.INT64, [])]


def _drop_dead(model: Any) -> None:
    """Remove the nodes no output depends on (the heads of closed exits), in every graph."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    cleaned = ir.to_proto(RemoveUnusedNodesPass()(ir.from_proto(model)).model)
    model.CopyFrom(cleaned)
