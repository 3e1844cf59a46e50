"""QDQ ONNX export of quantized models, and which nodes ONNX Runtime runs as integer kernels.

A model holding :class:`~slimkit.quant.modules.QuantLayer` modules is exported in the QDQ form
ONNX Runtime fuses into real integer kernels (QLinearConv, QGemm, QLinearMatMul, ...)::

    x_q -> DequantizeLinear -+
    W_int8 -> DequantizeLinear -+-> Conv/Gemm -> QuantizeLinear -> y_q
    b_int32 -> DequantizeLinear -+

The exporter traces fake-quantizers as QuantizeLinear/DequantizeLinear pairs; the graph is then
rewritten so the file really holds integers (about 4x smaller than float):

* ``QuantizeLinear(float weight constant)`` becomes an int8 initializer (slimkit's own codes,
  scales and zero points) feeding the weight's DequantizeLinear;
* float biases become int32 initializers with scale ``s_x * s_w`` (ORT's integer kernels need
  them so; slimkit's PTQ already put biases on that grid, so the values are unchanged);
* a ``Relu`` right after a DequantizeLinear whose zero point is the lowest code is dropped: its
  input is already >= 0, and the remaining ``Conv -> Q`` then fuses;
* ``DequantizeLinear -> QuantizeLinear`` with identical qparams is removed (it is the identity
  on codes), so shape ops and max pooling between two quantized layers run on int8 codes.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from slimkit.core.errors import ExportError
from slimkit.io.onnx_graph import add_initializer, const_array, only_consumer, sort_in_layers
from slimkit.quant.modules import FakeQuant, LayerAttrs, QuantLayer

if TYPE_CHECKING:
    import onnx

#: Float ops ORT should have replaced by integer kernels in a QDQ model.
COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
#: Integer kernels ORT fuses QDQ groups into.
INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul",
            "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
            "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QAttention")


def has_quant_layers(module: nn.Module) -> bool:
    """True when ``module`` contains a QuantLayer (it then exports as QDQ)."""
    return any(isinstance(m, QuantLayer) for m in module.modules())


def output_step(module: nn.Module) -> float | None:
    """The output quantization step of a model whose last QuantLayer quantizes its output.

    Returns:
        That step (the largest one, for per-channel output scales), or None when the model has
        no QuantLayer or its last one leaves the output in float.
    """
    last = [m for m in module.modules() if isinstance(m, QuantLayer)]
    scale = getattr(last[-1].output_fq, "scale", None) if last else None
    return None if scale is None else float(scale.detach().max())


class _QdqLayer(LayerAttrs, nn.Module):
    """Export twin of a QuantLayer: the weight as a float constant behind a weight fake-quant.

    The exporter turns ``fake_quantize(W)`` into ``QuantizeLinear(W) -> DequantizeLinear``;
    :func:`rewrite_qdq` then folds the QuantizeLinear into an int8 initializer.
    """

    def __init__(self, ql: QuantLayer) -> None:
        super().__init__()
        self.layer = copy.deepcopy(ql.layer)
        weight = ql.weight().detach().clone()
        if hasattr(self.layer, "weight"):
            del self.layer.weight
        self.register_buffer("w", weight)
        self.input_fq, self.output_fq = ql.input_fq, ql.output_fq
        self.weight_fq: FakeQuant | None = ql.weight_fq

    def _weight(self) -> torch.Tensor:
        fq = self.weight_fq
        if not isinstance(fq, FakeQuant) or fq.granularity.kind == "group":
            return self.w  # stays float: not an ORT integer-kernel scheme
        # Codes of 2..8 bits fit int8/uint8 storage and run on ORT's 8-bit kernels; the
        # values are already on the grid, so the wider clamp changes nothing.
        lo, hi = (-128, 127) if fq.signed else (0, 255)
        if fq.granularity.kind == "tensor":
            return torch.fake_quantize_per_tensor_affine(self.w, fq.scale, fq.zero_point, lo, hi)
        return torch.fake_quantize_per_channel_affine(
            self.w, fq.scale.flatten(), fq.zero_point.flatten(), fq.granularity.axis % self.w.dim(),
            lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fq is not None:
            x = self.input_fq(x)
        w = self._weight()
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        return y if self.output_fq is None else self.output_fq(y)


def export_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with each QuantLayer swapped for its export twin.

    Example:
        >>> torch.onnx.export(export_module(qmodel), example, "q.onnx")  # doctest: +SKIP
    """
    from slimkit.io.model import replace_module

    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLayer):
            if not name:
                return _QdqLayer(m)
            replace_module(out, name, _QdqLayer(m))
    return out


# --------------------------------------------------------------------------- graph rewriting
# The rewrites edit an onnx-ir model: each value knows its producer and its uses, and
# ``replace_all_uses_with`` rewires every reader at once. New nodes are appended; the graph is
# put back in order (and stripped of what nobody reads) by :func:`_prune`.


def _users(value: ir.Value) -> list[ir.Node]:
    """The nodes reading ``value``, once per input that reads it."""
    return [u.node for u in value.uses()]


def _bypass(old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old`` reads ``new``; a graph output ``old`` keeps its name (and type)
    through an ``Identity`` of ``new``."""
    graph = old.graph
    if old.is_graph_output() and graph is not None:
        ident = ir.node("Identity", [new], name=f"{old.name}_Identity")
        out = ident.outputs[0]
        for k, o in enumerate(graph.outputs):
            if o is old:
                graph.outputs[k] = out
        out.name, old.name = old.name, None
        out.type, out.shape = old.type, old.shape
        graph.append(ident)
    old.replace_all_uses_with(new)


def _new_node(graph: ir.Graph, op: str, inputs: list[ir.Value | None], output: str,
              **attrs: Any) -> ir.Value:
    """Append an ``op`` node writing one value named ``output``; returns that value."""
    node = ir.node(op, inputs, attrs or None, name=f"{output}_{op}")
    node.outputs[0].name = output
    graph.append(node)
    return node.outputs[0]


def _qparams(node: ir.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scale, zero point, axis) of a Q/DQ node when they are constants."""
    scale = const_array(node.inputs[1])
    zero = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None or zero is None:
        return None
    return scale, zero, node.attributes.get_int("axis", 1)


def _resolve_identities(graph: ir.Graph) -> int:
    """Identity nodes of constants (the exporter's de-duplicated scales): use the constant."""
    done = 0
    for n in list(graph):
        if n.op_type == "Identity" and const_array(n.inputs[0]) is not None \
                and not n.outputs[0].is_graph_output():
            n.outputs[0].replace_all_uses_with(n.inputs[0])
            graph.remove(n, safe=True)
            done += 1
    return done


def _quantize_np(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear in numpy: round half to even, saturate to the zero point's type."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zero.dtype)


def _fold_weight_quantizers(graph: ir.Graph) -> int:
    """QuantizeLinear(float constant) -> the int8 initializer it computes."""
    done = 0
    for n in list(graph):
        weight = const_array(n.inputs[0]) if n.op_type == "QuantizeLinear" else None
        qp = None if weight is None else _qparams(n)
        if qp is None:
            continue
        codes = add_initializer(graph, f"{n.inputs[0].name}_quantized", _quantize_np(weight, *qp))
        _bypass(n.outputs[0], codes)
        graph.remove(n, safe=True)
        done += 1
    return done


def _dq_source(value: ir.Value | None) -> tuple[ir.Node, tuple] | None:
    """The DequantizeLinear producing ``value`` and its constant qparams, else None."""
    node = None if value is None else value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        return None
    qp = _qparams(node)
    return (node, qp) if qp is not None else None


def _bias_scale(n: ir.Node, bias: np.ndarray) -> np.ndarray | None:
    """``s_x * s_w`` per bias element for a Conv/Gemm fed by DQ(x), DQ(int8 W), else None."""
    x, w = _dq_source(n.inputs[0]), _dq_source(n.inputs[1])
    weight = None if w is None else const_array(w[0].inputs[0])
    if x is None or weight is None:
        return None
    attrs = n.attributes
    if n.op_type == "Gemm" and (not attrs.get_int("transB", 0) or attrs.get_float("alpha", 1.0)
                                != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or bias.ndim != 1):
        return None
    s_x, s_w = x[1][0].astype(np.float32), w[1][0].astype(np.float32)
    if s_x.size != 1 or (s_w.size > 1 and w[1][2] % weight.ndim != 0):
        return None  # per-channel activations or weights not per output channel
    scale = (s_x.reshape(()) * s_w.reshape(-1)).astype(np.float32)
    return np.broadcast_to(scale, bias.shape).copy()


def _quantize_biases(graph: ir.Graph) -> int:
    """Float bias of a Conv/Gemm fed by DQ(x), DQ(W) -> DQ(int32 bias, s_x * s_w)."""
    done = 0
    for n in list(graph):
        if n.op_type not in ("Conv", "Gemm") or len(n.inputs) < 3:
            continue
        bias = const_array(n.inputs[2])
        scale = None if bias is None else _bias_scale(n, bias)
        if scale is None:
            continue
        q = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1)
        # Named after the consuming node: the exporter merges equal bias tensors (all-zero
        # biases after BN folding, a layer called twice), and each consumer gets its own scale.
        base = f"{n.outputs[0].name}_bias"
        inputs = [add_initializer(graph, base + "_int32", q.astype(np.int32)),
                  add_initializer(graph, base + "_scale", scale),
                  add_initializer(graph, base + "_zero", np.zeros(bias.shape, np.int32))]
        n.replace_input_with(2, _new_node(graph, "DequantizeLinear", inputs, base + "_dq",
                                          axis=0))
        done += 1
    return done


def _drop_redundant_relus(graph: ir.Graph) -> int:
    """Relu(DQ(q)) with the zero point at the lowest code is the identity: remove it."""
    done = 0
    for n in list(graph):
        src = _dq_source(n.inputs[0]) if n.op_type == "Relu" else None
        if src is None:
            continue
        zero = src[1][1]
        if np.all(zero.astype(np.int64) == np.iinfo(zero.dtype).min):
            _bypass(n.outputs[0], n.inputs[0])
            graph.remove(n, safe=True)
            done += 1
    return done


def _same(a: tuple, b: tuple) -> bool:
    return (a[0].shape == b[0].shape and np.array_equal(a[0], b[0])
            and a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1])
            and (a[0].size == 1 or a[2] == b[2]))


def _drop_requantize(graph: ir.Graph) -> int:
    """DQ -> Q with the same qparams returns the codes it was given: bypass both."""
    done = 0
    for n in list(graph):
        if n.op_type != "QuantizeLinear":
            continue
        src, qp = _dq_source(n.inputs[0]), _qparams(n)
        if src is None or qp is None or not _same(src[1], qp):
            continue
        _bypass(n.outputs[0], src[0].inputs[0])
        graph.remove(n, safe=True)
        done += 1
    return done


def _move_requantize_through_shape_ops(graph: ir.Graph) -> int:
    """DQ -> (MaxPool | Flatten | Reshape) -> Q with equal qparams: run the op on the codes.

    Max pooling commutes with the monotone map from codes to values, and shape ops move
    elements without touching them, so ``Q(op(DQ(q))) == op(q)`` exactly.
    """
    done = 0
    for n in list(graph):
        if n.op_type not in ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze",
                             "Unsqueeze"):
            continue
        src, users = _dq_source(n.inputs[0]), _users(n.outputs[0])
        if src is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        qp = _qparams(q)
        if qp is None or not _same(src[1], qp) or src[1][0].size != 1:
            continue
        n.replace_input_with(0, src[0].inputs[0])
        n.outputs[0].type = q.outputs[0].type  # it now holds the codes
        _bypass(q.outputs[0], n.outputs[0])
        graph.remove(q, safe=True)
        done += 1
    return done


def _pin_quantizers_after_float_pools(graph: ir.Graph) -> int:
    """Float ``MaxPool -> Q``: put an exact ``Clip`` between them so the pool stays float.

    ONNX Runtime moves a QuantizeLinear above a MaxPool (QDQ propagation) and then pools the
    uint8 codes in NCHW layout, which its CPU kernels do about 5-10x slower than its blocked
    float pooling (measured with ORT 1.32: 2.0 ms against 0.2-0.4 ms for 32x20x24x24). Clip is
    not propagated through. Clipping to ``[lo + s/4, hi - s/4]``, where ``[lo, hi]`` is the
    range the codes cover, changes no code: a value clipped there rounds to the same end code
    it saturated to before (the bounds lie within a quarter step of the end codes), and ORT's
    Clip/Q fusion keeps a Clip that is narrower than the quantizer's range.
    """
    done = 0
    for n in list(graph):
        q = only_consumer(n.outputs[0], "QuantizeLinear") if n.op_type == "MaxPool" else None
        if q is None or _dq_source(n.inputs[0]):
            continue
        qp = _qparams(q)
        if qp is None or qp[0].size != 1:
            continue
        scale, zero = float(qp[0].reshape(())), float(qp[1].reshape(()))
        info = np.iinfo(qp[1].dtype)
        lo = (info.min - zero) * scale + scale / 4
        hi = (info.max - zero) * scale - scale / 4
        base = q.inputs[0].name
        bounds = [add_initializer(graph, f"{base}_clip_{k}", np.array(v, np.float32))
                  for k, v in (("lo", lo), ("hi", hi))]
        q.replace_input_with(0, _new_node(graph, "Clip", [q.inputs[0], *bounds],
                                          f"{base}_pinned"))
        done += 1
    return done


#: Ops the rewrite evaluates when all their inputs are constants: the exporter leaves the
#: arithmetic of a padding computed in Python (TF "SAME" padding) as Concat/Slice/Cast nodes.
_CONST_OPS = ("Cast", "Reshape", "Transpose", "Slice", "Concat", "ConstantOfShape", "Unsqueeze",
              "Squeeze", "Gather", "Identity")


def _fold_constant_ops(graph: ir.Graph) -> int:
    """Nodes of :data:`_CONST_OPS` whose inputs are all constants -> their value (computed by
    ONNX's reference evaluator), so the rewrites below can read pads and bounds."""
    from onnx.reference import ReferenceEvaluator

    done = 0
    for n in list(graph):
        inputs = [i for i in n.inputs if i is not None]
        if n.op_type not in _CONST_OPS or not inputs \
                or any(o.is_graph_output() for o in n.outputs):
            continue
        feeds = {i.name: const_array(i) for i in inputs}
        if any(v is None for v in feeds.values()):
            continue
        values = ReferenceEvaluator(ir.serde.serialize_node(n)).run(None, feeds)
        for out, value in zip(n.outputs, values, strict=True):
            name, out.name = out.name, None
            out.replace_all_uses_with(add_initializer(graph, name, np.asarray(value)))
        graph.remove(n, safe=True)
        done += 1
    return done


def _zero_spatial_pads(n: ir.Node) -> np.ndarray | None:
    """The ``[begin..., end...]`` spatial pads of a constant-zero ``Pad`` of N, C, spatial."""
    if n.op_type != "Pad" or n.attributes.get_string("mode", "constant") != "constant" \
            or (len(n.inputs) > 3 and n.inputs[3] is not None):
        return None
    pads = const_array(n.inputs[1])
    value = (const_array(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] is not None
             else np.zeros(()))
    if pads is None or value is None or np.any(value != 0) or pads.size < 6 or np.any(pads < 0):
        return None
    rank = pads.size // 2
    if np.any(pads[:2]) or np.any(pads[rank:rank + 2]):
        return None
    return np.concatenate([pads[2:rank], pads[rank + 2:]]).astype(np.int64)


def _pad_readers(pad: ir.Node) -> tuple[ir.Node | None, list[ir.Node]] | None:
    """For ``Pad -> [Q -> DQ...] -> Conv...``: (the Q or None, the Convs), when every path from
    the Pad ends in a Conv reading it as its data input, else None."""
    out = pad.outputs[0]
    users = _users(out)
    if not users or out.is_graph_output():
        return None
    head, tensors = None, [out]
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        head = users[0]
        dqs = _users(head.outputs[0])
        if not dqs or head.outputs[0].is_graph_output() or any(
                d.op_type != "DequantizeLinear" or d.outputs[0].is_graph_output() for d in dqs):
            return None
        tensors = [d.outputs[0] for d in dqs]
    convs = [c for t in tensors for c in _users(t)]
    if not convs or any(c.op_type != "Conv" or c.inputs[0] not in tensors
                        or c.attributes.get_string("auto_pad", "NOTSET") != "NOTSET"
                        for c in convs):
        return None
    return head, convs


def _fold_pads_into_convs(graph: ir.Graph) -> int:
    """Zero ``Pad -> [Q -> DQ] -> Conv`` -> ``[Q -> DQ] -> Conv`` with the pads in the Conv.

    Exact: the Conv pads with zeros, and a quantizer maps 0 to its zero point, which
    dequantizes to 0 again. Without it a float Pad sits between two integer convolutions
    (TF "SAME" padding of Hugging Face MobileNetV2) and ONNX Runtime runs it on NCHW data.
    """
    done = 0
    for n in list(graph):
        pads = _zero_spatial_pads(n)
        readers = None if pads is None else _pad_readers(n)
        if readers is None:
            continue
        head, convs = readers
        old = [np.asarray(c.attributes.get_ints("pads", [0] * pads.size), np.int64)
               for c in convs]
        if any(o.size != pads.size for o in old):
            continue
        for c, o in zip(convs, old, strict=True):
            c.attributes["pads"] = ir.AttrInt64s("pads", (o + pads).tolist())
        for reader in [head] if head is not None else convs:
            reader.replace_input_with(0, n.inputs[0])
        graph.remove(n, safe=True)
        done += 1
    return done


def _clip_changes_no_code(n: ir.Node, src: tuple) -> bool | None:
    """Whether ``DQ -> Clip`` ``n`` leaves every code as it is, or only changes what the
    following quantizers (all with ``src``'s qparams) round back; None for non-constant
    bounds."""
    bounds = [const_array(n.inputs[k]) if len(n.inputs) > k and n.inputs[k] is not None else False
              for k in (1, 2)]
    if any(b is None for b in bounds):
        return None
    scale, zero = src[1][0].reshape(()), src[1][1].reshape(())
    info = np.iinfo(zero.dtype)
    codes = np.arange(info.min, info.max + 1)
    vals = ((codes - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32)
    lo = -np.inf if bounds[0] is False else float(bounds[0])
    hi = np.inf if bounds[1] is False else float(bounds[1])
    clipped = np.clip(vals, lo, hi).astype(np.float32)
    users = _users(n.outputs[0])
    same_q = bool(users) and all(u.op_type == "QuantizeLinear" and _qparams(u) is not None
                                 and _same(src[1], _qparams(u)) for u in users)
    requant = _quantize_np(clipped, scale, zero, 0).astype(np.int64)
    return np.array_equal(clipped, vals) or (same_q and np.array_equal(requant, codes))


def _drop_clips_on_codes(graph: ir.Graph) -> int:
    """``DQ -> Clip`` that changes no dequantized code, or whose change the following
    quantizers (same qparams) round away, checked on every code: bypass the Clip.

    A ReLU6 between two integer convolutions whose shared quantizer ends at or below 6 is
    then gone, and ``Conv -> Q`` fuses (ONNX Runtime's own Clip/Q fusion would need the Clip
    right before the Q).
    """
    done = 0
    for n in list(graph):
        src = _dq_source(n.inputs[0]) if n.op_type == "Clip" else None
        if src is None or src[1][0].size != 1 or not _clip_changes_no_code(n, src):
            continue
        _bypass(n.outputs[0], n.inputs[0])
        graph.remove(n, safe=True)
        done += 1
    return done


def _prune(model: ir.Model) -> None:
    """Drop nodes whose outputs nobody uses and initializers nobody reads (until none is
    left), then sort the nodes as ONNX requires."""
    while RemoveUnusedNodesPass()(model).modified:
        pass
    sort_in_layers(model.graph)


def rewrite_qdq(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Rewrite an exported fake-quant graph in place into ORT's integer-kernel QDQ form.

    Args:
        model: an ``onnx_ir.Model``, or an ``onnx.ModelProto`` (rewritten in place too).

    Returns:
        How many rewrites of each kind were made.

    Raises:
        ExportError: the rewritten graph has a cycle or a dangling input.

    Example:
        >>> stats = rewrite_qdq(onnx_ir.load("exported.onnx"))  # doctest: +SKIP
    """
    if not isinstance(model, ir.Model):  # a ModelProto: rewrite its IR, write it back
        ir_model = ir.serde.deserialize_model(model)
        stats = rewrite_qdq(ir_model)
        model.CopyFrom(ir.serde.serialize_model(ir_model))
        return stats
    g = model.graph
    stats = {"identities": _resolve_identities(g),
             "constants_folded": _fold_constant_ops(g),
             "int8_weights": _fold_weight_quantizers(g),
             "int32_biases": _quantize_biases(g),
             "relus_dropped": _drop_redundant_relus(g),
             "pads_into_convs": _fold_pads_into_convs(g),
             "clips_dropped": _drop_clips_on_codes(g),
             "requantize_dropped": _drop_requantize(g)}
    stats["int8_shape_ops"] = _move_requantize_through_shape_ops(g)
    stats["requantize_dropped"] += _drop_requantize(g)
    _prune(model)
    stats["float_pools_pinned"] = _pin_quantizers_after_float_pools(g)
    _prune(model)
    return stats


def postprocess_qdq(path: str | Path) -> dict[str, int]:
    """Load ``path``, :func:`rewrite_qdq` it, check it and save it back (same path).

    Raises:
        ExportError: the rewritten graph fails the ONNX checker.
    """
    import onnx

    model = ir.load(str(path))
    stats = rewrite_qdq(model)
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"QDQ rewrite of '{path}' produced an invalid graph: "
                          f"{str(exc).splitlines()[0]}") from exc
    onnx.save(proto, str(path))
    return stats


# ------------------------------------------------------------------------------- inspection


def _dq_source_op(value: ir.Value | None) -> str | None:
    """The op type of the node producing ``value`` (None for graph inputs, constants)."""
    node = None if value is None else value.producer()
    return None if node is None else node.op_type


def int8_ops(onnx_path: str | Path, threads: int = 1) -> dict[str, Any]:
    """Which nodes ONNX Runtime runs as integer kernels once it has optimized ``onnx_path``.

    The model is opened with all graph optimizations and ``optimized_model_filepath``; the
    optimized graph is then counted per op type.

    Returns:
        ``{"op_counts": {op: n}, "int8_nodes": n, "float_compute": [...],
        "float_fallbacks": [...], "all_int8": bool}``: ``float_compute`` lists Conv/Gemm/MatMul
        nodes still running in float; ``float_fallbacks`` those of them fed by a
        DequantizeLinear (a QDQ group ORT did not fuse: it pays the quantize/dequantize cost
        without the integer speed-up). A float layer kept on purpose before the first
        quantizer is listed in ``float_compute`` only.

    Example:
        >>> int8_ops("model.onnx")["op_counts"]  # doctest: +SKIP
        {'QGemm': 2, 'QLinearConv': 1, ...}
    """
    import tempfile

    from slimkit.io.onnx_model import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(onnx_path, threads, optimized_path=opt)
        graph = ir.load(str(opt)).graph
    counts = Counter(n.op_type for n in graph)
    floats, fallbacks = [], []
    for n in graph:
        if n.op_type not in COMPUTE_OPS:
            continue
        floats.append(n.name or n.outputs[0].name)
        if any(_dq_source_op(i) == "DequantizeLinear" for i in n.inputs):
            # the integer chain was broken here: dequantize, float compute
            fallbacks.append(n.name or n.outputs[0].name)
    int8 = sum(c for op, c in counts.items() if op in INT8_OPS)
    return {"op_counts": dict(sorted(counts.items())), "int8_nodes": int8,
            "float_compute": floats, "float_fallbacks": fallbacks,
            "all_int8": not floats and int8 > 0}

