"""ONNX graph pass: one integer matmul for sibling dynamically quantized linears.

Dynamic INT8 layers that read the same tensor (an attention block's q, k and v projections)
each export ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(s_x * s_w) [-> Add b]``.
They quantize the same input to the same codes, so their weights can be concatenated along
the output axis: one ``MatMulInteger`` with the concatenated codes (and per-channel scales,
zero points and biases), then a ``Split`` back into the original outputs. The result is
bit-identical (every output column is the same integer dot product and the same float
rescale) and ONNX Runtime fuses the single chain into one ``DynamicQuantizeMatMul`` kernel:
one quantization and one GEMM instead of three of each. Layers without a bias join with a
zero bias.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimkit.io.onnx_graph import OnnxGraphIndex


@dataclass
class _Chain:
    """One dynamically quantized linear as exported: its nodes and constants."""

    x: str
    nodes: list[onnx.NodeProto]
    weight: np.ndarray  # [K, N] int8 / uint8
    weight_zero: np.ndarray | None  # [N] or None
    scale: np.ndarray  # [N] float
    bias: np.ndarray | None  # [N] float
    out: str

    def key(self) -> tuple:
        return self.x, self.weight.dtype.str, self.weight.shape[0], self.weight_zero is None


class _Graph(OnnxGraphIndex):
    """Producer/consumer maps and constant lookup over an ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        super().__init__(graph)
        self.inits = {t.name: t for t in graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer (possibly behind Identity/Constant)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _chain(g: _Graph, dql: onnx.NodeProto) -> _Chain | None:
    """Match the exported chain of one DynamicQuantLinear starting at its DynamicQuantizeLinear."""
    q, s, z = dql.output
    nodes = [dql]
    user = g.only(q, "Cast")
    if user is not None and _cast_to(user) == TensorProto.UINT8:  # a no-op cast the exporter keeps
        nodes.append(user)
        q = user.output[0]
    mmi = g.only(q, "MatMulInteger")
    if mmi is None or mmi.input[2] != z or len(g.users(z)) != 1:
        return None
    weight = g.const(mmi.input[1])
    has_wzero = len(mmi.input) > 3 and bool(mmi.input[3])
    wzero = g.const(mmi.input[3]) if has_wzero else None
    if weight is None or weight.ndim != 2 or (
            has_wzero and (wzero is None or wzero.shape != (weight.shape[1],))):
        return None
    cast = g.only(mmi.output[0], "Cast")
    mul = g.only(cast.output[0], "Mul") if cast is not None else None
    rescale = g.only(s, "Mul")
    if mul is None or rescale is None or _cast_to(cast) != TensorProto.FLOAT \
            or rescale.output[0] not in mul.input:
        return None
    scale = g.const(next(i for i in rescale.input if i != s))
    if scale is None or scale.shape != (weight.shape[1],):
        return None
    nodes += [mmi, cast, rescale, mul]
    out, bias = mul.output[0], None
    add = g.only(out, "Add")
    if add is not None:
        bias = g.const(next((i for i in add.input if i != out), out))
        if bias is not None and bias.shape == (weight.shape[1],):
            nodes.append(add)
            out = add.output[0]
        else:
            bias = None
    return _Chain(dql.input[0], nodes, weight, wzero, scale, bias, out)


def _fused_nodes(g: _Graph, chains: list[_Chain], tag: str) -> list[onnx.NodeProto]:
    """One DynamicQuantizeLinear -> MatMulInteger -> rescale [-> Add] -> Split for ``chains``."""
    first = chains[0]

    def init(name: str, value: np.ndarray) -> str:
        g.graph.initializer.append(numpy_helper.from_array(value, f"{tag}/{name}"))
        return f"{tag}/{name}"

    weight = init("weight", np.concatenate([c.weight for c in chains], axis=1))
    names = {k: f"{tag}/{k}" for k in ("q", "s", "z", "acc", "accf", "rs", "y", "yb")}
    mmi_inputs = [names["q"], weight, names["z"]]
    if first.weight_zero is not None:
        mmi_inputs.append(init("weight_zero",
                               np.concatenate([c.weight_zero for c in chains])))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [first.x],
                         [names["q"], names["s"], names["z"]], name=f"{tag}/quantize"),
        helper.make_node("MatMulInteger", mmi_inputs, [names["acc"]], name=f"{tag}/matmul"),
        helper.make_node("Cast", [names["acc"]], [names["accf"]], to=TensorProto.FLOAT,
                         name=f"{tag}/cast"),
        helper.make_node("Mul", [names["s"], init("scale", np.concatenate(
            [c.scale for c in chains]).astype(np.float32))], [names["rs"]], name=f"{tag}/rs"),
        helper.make_node("Mul", [names["accf"], names["rs"]], [names["y"]], name=f"{tag}/mul"),
    ]
    y = names["y"]
    if any(c.bias is not None for c in chains):  # a layer without bias adds exact zeros
        bias = init("bias", np.concatenate([np.zeros(c.weight.shape[1]) if c.bias is None
                                            else c.bias for c in chains]).astype(np.float32))
        nodes.append(helper.make_node("Add", [y, bias], [names["yb"]], name=f"{tag}/bias"))
        y = names["yb"]
    sizes = init("split", np.array([c.weight.shape[1] for c in chains], dtype=np.int64))
    nodes.append(helper.make_node("Split", [y, sizes], [c.out for c in chains], axis=-1,
                                  name=f"{tag}/split"))
    return nodes


def _prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {o for n in graph.node for o in n.output} | used
    keep_vi = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)


def fuse_sibling_matmul_integer(model: onnx.ModelProto) -> list[list[str]]:
    """Merge dynamically quantized linears that read the same tensor (in place).

    Returns:
        The groups merged, each as the list of the original output tensor names.
    """
    g = _Graph(model.graph)
    groups: dict[tuple, list[_Chain]] = defaultdict(list)
    for node in list(model.graph.node):
        if node.op_type == "DynamicQuantizeLinear":
            chain = _chain(g, node)
            if chain is not None:
                groups[chain.key()].append(chain)
    merged, insert, gone = [], {}, set()
    for k, chains in enumerate(c for c in groups.values() if len(c) > 1):
        outs = {n.output[0] for c in chains for n in c.nodes}
        at = min(i for i, n in enumerate(model.graph.node) if n.output[0] in outs)
        insert[at] = _fused_nodes(g, chains, f"slimkit_fused_qmatmul_{k}")
        gone |= outs
        merged.append([c.out for c in chains])
    nodes = []
    for i, n in enumerate(model.graph.node):
        nodes += insert.get(i, [])
        if n.output[0] not in gone:
            nodes.append(onnx.NodeProto.FromString(n.SerializeToString()))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if merged:
        _prune_dead(model.graph)
    return merged


def fuse_file(path: str | Path) -> list[list[str]]:
    """Apply :func:`fuse_sibling_matmul_integer` to an ONNX file in place."""
    model = onnx.load(str(path))
    merged = fuse_sibling_matmul_integer(model)
    if merged:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return merged
