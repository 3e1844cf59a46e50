"""ONNX helpers of io/: the graph index, the ONNX Runtime session, and io/'s place in the layers."""

import ast
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import slimkit.io
from slimkit.io.onnx_graph import OnnxGraphIndex
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


def test_graph_index_maps_producers_and_consumers_in_order():
    g = OnnxGraphIndex(_graph().graph)
    assert {k: n.name for k, n in g.producer.items()} == {"r": "relu", "a": "neg", "b": "abs",
                                                          "y": "add"}
    assert [n.name for n in g.users("r")] == ["neg", "abs"]
    assert g.users("y") == [] and g.users("nothing") == []
    assert g.producer_op("a") == "Neg" and g.producer_op("x") is None
    assert g.only("x", "Relu").name == "relu"
    assert g.only("r", "Neg") is None  # two consumers
    assert g.only("a", "Mul") is None  # one consumer, another op


def test_graph_index_refresh_sees_rewired_nodes():
    model = _graph()
    g = OnnxGraphIndex(model.graph)
    model.graph.node[3].input[1] = "r"  # add now reads a and r; abs is dead
    assert [n.name for n in g.users("b")] == ["add"]  # stale until refreshed
    g.refresh()
    assert g.users("b") == []
    assert [n.name for n in g.users("r")] == ["neg", "abs", "add"]


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
