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
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from slimkit.io.onnx_graph import add_initializer, const_array, only_consumer


@dataclass
class _Chain:
    """One dynamically quantized linear as exported: its nodes and constants."""

    x: ir.Value
    nodes: list[ir.Node]
    weight: np.ndarray  # [K, N] int8 / uint8
    weight_zero: np.ndarray | None  # [N] or None
    scale: np.ndarray  # [N] float
    bias: np.ndarray | None  # [N] float
    out: ir.Value

    def key(self) -> tuple:
        return id(self.x), self.weight.dtype.str, self.weight.shape[0], self.weight_zero is None


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node, possibly behind Identity nodes."""
    array = const_array(value)
    node = None if value is None or array is not None else value.producer()
    if node is not None and node.op_type == "Identity":
        return _const(node.inputs[0])
    return array


def _chain(dql: ir.Node) -> _Chain | None:
    """Match the exported chain of one DynamicQuantLinear starting at its DynamicQuantizeLinear."""
    q, s, z = dql.outputs
    nodes = [dql]
    user = only_consumer(q, "Cast")
    if user is not None and user.attributes["to"].as_int() == ir.DataType.UINT8:
        nodes.append(user)  # a no-op cast the exporter keeps
        q = user.outputs[0]
    mmi = only_consumer(q, "MatMulInteger")
    if mmi is None or mmi.inputs[2] is not z or len(z.uses()) != 1:
        return None
    weight = _const(mmi.inputs[1])
    wz = mmi.inputs[3] if len(mmi.inputs) > 3 else None
    wzero = _const(wz) if wz is not None else None
    if weight is None or weight.ndim != 2 or (
            wz is not None and (wzero is None or wzero.shape != (weight.shape[1],))):
        return None
    cast = only_consumer(mmi.outputs[0], "Cast")
    mul = only_consumer(cast.outputs[0], "Mul") if cast is not None else None
    rescale = only_consumer(s, "Mul")
    if mul is None or rescale is None or cast.attributes["to"].as_int() != ir.DataType.FLOAT \
            or rescale.outputs[0] not in mul.inputs:
        return None
    scale = _const(next(i for i in rescale.inputs if i is not s))
    if scale is None or scale.shape != (weight.shape[1],):
        return None
    nodes += [mmi, cast, rescale, mul]
    out, bias = mul.outputs[0], None
    add = only_consumer(out, "Add")
    if add is not None:
        bias = _const(next((i for i in add.inputs if i is not out), out))
        if bias is not None and bias.shape == (weight.shape[1],):
            nodes.append(add)
            out = add.outputs[0]
        else:
            bias = None
    return _Chain(dql.inputs[0], nodes, weight, wzero, scale, bias, out)


def _fused_nodes(graph: ir.Graph, chains: list[_Chain], tag: str) -> list[ir.Node]:
    """One DynamicQuantizeLinear -> MatMulInteger -> rescale [-> Add] -> Split for ``chains``;
    the Split's outputs take over the chains' outputs (names included)."""
    def init(name: str, value: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{tag}/{name}", value)

    first = chains[0]
    weight = init("weight", np.concatenate([c.weight for c in chains], axis=1))
    quantize = ir.node("DynamicQuantizeLinear", [first.x], num_outputs=3, name=f"{tag}/quantize")
    q, s, z = quantize.outputs
    wzero = (init("weight_zero", np.concatenate([c.weight_zero for c in chains]))
             if first.weight_zero is not None else None)
    matmul = ir.node("MatMulInteger", [q, weight, z, *([wzero] if wzero else [])],
                     name=f"{tag}/matmul")
    cast = ir.node("Cast", matmul.outputs, {"to": ir.DataType.FLOAT}, name=f"{tag}/cast")
    scale = init("scale", np.concatenate([c.scale for c in chains]).astype(np.float32))
    rs = ir.node("Mul", [s, scale], name=f"{tag}/rs")
    mul = ir.node("Mul", [cast.outputs[0], rs.outputs[0]], name=f"{tag}/mul")
    nodes = [quantize, matmul, cast, rs, mul]
    y = mul.outputs[0]
    if any(c.bias is not None for c in chains):  # a layer without bias adds exact zeros
        bias = init("bias", np.concatenate([np.zeros(c.weight.shape[1]) if c.bias is None
                                            else c.bias for c in chains]).astype(np.float32))
        nodes.append(ir.node("Add", [y, bias], name=f"{tag}/bias"))
        y = nodes[-1].outputs[0]
    sizes = init("split", np.array([c.weight.shape[1] for c in chains], dtype=np.int64))
    split = ir.node("Split", [y, sizes], {"axis": -1}, num_outputs=len(chains),
                    name=f"{tag}/split")
    for c, new in zip(chains, split.outputs, strict=True):
        name = c.out.name
        c.out.replace_all_uses_with(new, replace_graph_outputs=True)
        c.out.name, new.name = None, name
    return [*nodes, split]


def fuse_sibling_matmul_integer(model: ir.Model) -> list[list[str]]:
    """Merge dynamically quantized linears that read the same tensor (in place).

    Returns:
        The groups merged, each as the list of the original output tensor names.
    """
    graph = model.graph
    groups: dict[tuple, list[_Chain]] = defaultdict(list)
    for node in list(graph):
        if node.op_type == "DynamicQuantizeLinear":
            chain = _chain(node)
            if chain is not None:
                groups[chain.key()].append(chain)
    merged = []
    for k, chains in enumerate(c for c in groups.values() if len(c) > 1):
        order = {id(n): i for i, n in enumerate(graph)}
        at = min((n for c in chains for n in c.nodes), key=lambda n: order[id(n)])
        names = [c.out.name for c in chains]
        graph.insert_before(at, _fused_nodes(graph, chains, f"slimkit_fused_qmatmul_{k}"))
        merged.append(names)
    if merged:
        RemoveUnusedNodesPass()(model)  # the old chains and their constants
    return merged


def fuse_file(path: str | Path) -> list[list[str]]:
    """Apply :func:`fuse_sibling_matmul_integer` to an ONNX file in place."""
    model = ir.load(str(path))
    merged = fuse_sibling_matmul_integer(model)
    if merged:
        proto = ir.to_proto(model)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    return merged
