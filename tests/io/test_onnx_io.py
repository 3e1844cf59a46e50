"""ONNX helpers of io/: onnx-ir graph helpers, the ONNX Runtime session, io/'s layer place."""

import ast
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import slimkit.io
from slimkit.core.errors import ExportError
from slimkit.io.onnx_graph import add_initializer, const_array, only_consumer, sort_in_layers
from slimkit.io.onnx_model import ort_options, ort_session

#: Packages above io/ in the layering (ARCHITECTURE.md): io/ must not import them.
ABOVE_IO = {"graph", "measure", "train", "prune", "quant", "distill", "lowrank", "encode",
            "pipeline", "export", "report", "api", "cli", "cli_views"}


def _graph() -> onnx.ModelProto:
    """x -> Relu -> r; r -> Neg -> a; r -> Abs -> b; a + b -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["a"], name="neg"),
             helper.make_node("Abs", ["r"], ["b"], name="abs"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", [vi[0]], [vi[1]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_only_consumer_counts_every_use():
    graph = ir.serde.deserialize_model(_graph()).graph
    nodes = {n.name: n for n in graph}
    r = nodes["relu"].outputs[0]
    assert only_consumer(graph.inputs[0], "Relu") is nodes["relu"]
    assert only_consumer(r, "Neg") is None  # two consumers
    assert only_consumer(nodes["neg"].outputs[0], "Mul") is None  # one consumer, another op
    assert only_consumer(nodes["add"].outputs[0], "Add") is None  # a graph output, no reader
    nodes["add"].replace_input_with(1, nodes["neg"].outputs[0])  # add(a, a): read twice
    assert only_consumer(nodes["neg"].outputs[0], "Add") is None


def test_constants_and_initializers():
    model = _graph()
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.INT64, [2], [3, 4])))
    graph = ir.serde.deserialize_model(model).graph
    constant = next(n for n in graph if n.op_type == "Constant").outputs[0]
    np.testing.assert_array_equal(const_array(constant), np.array([3, 4]))
    assert const_array(graph.inputs[0]) is None and const_array(None) is None
    a = add_initializer(graph, "w", np.arange(3, dtype=np.int8))
    b = add_initializer(graph, "w", np.ones(2, np.float32))  # the name is taken
    assert (a.name, b.name) == ("w", "w_1") and graph.initializers["w_1"] is b
    np.testing.assert_array_equal(const_array(a), np.arange(3, dtype=np.int8))


def test_sort_in_layers_orders_by_layer_and_rejects_a_cycle():
    graph = ir.serde.deserialize_model(_graph()).graph
    nodes = {n.name: n for n in graph}
    graph.remove(nodes["relu"])
    graph.append(nodes["relu"])  # now last: its readers come before it
    sort_in_layers(graph)
    assert [n.name for n in graph] == ["relu", "neg", "abs", "add"]
    sort_in_layers(graph)  # already sorted: unchanged
    assert [n.name for n in graph] == ["relu", "neg", "abs", "add"]
    nodes["relu"].replace_input_with(0, nodes["add"].outputs[0])  # relu <- add <- relu
    with pytest.raises(ExportError, match="cycle"):
        sort_in_layers(graph)


def test_ort_session_runs_and_writes_the_optimized_graph(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_graph(), str(path))
    opts = ort_options(2)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert opts.optimized_model_filepath == ""
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], dtype=np.float32)
    out = ort_session(path, 1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, np.zeros_like(x))  # -relu(x) + |relu(x)|
    opt = tmp_path / "optimized.onnx"
    ort_session(path, 1, optimized_path=opt)
    assert {n.op_type for n in onnx.load(str(opt)).graph.node} <= {"Relu", "Neg", "Abs", "Add"}


def _slimkit_imports(path: Path) -> set[str]:
    """Top-level slimkit packages ``path`` imports, at any scope."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {n.split(".")[1] for n in names if n.startswith("slimkit.")}
    return found


IO_MODULES = sorted(m.name for m in pkgutil.iter_modules(slimkit.io.__path__))


@pytest.mark.parametrize("module", IO_MODULES)
def test_io_imports_nothing_above_it(module: str):
    path = Path(importlib.import_module(f"slimkit.io.{module}").__file__)
    assert _slimkit_imports(path) & ABOVE_IO == set()


def test_the_import_scan_sees_imports():
    loader = Path(importlib.import_module("slimkit.io.loader").__file__)
    assert {"core", "data", "zoo", "io"} <= _slimkit_imports(loader)
