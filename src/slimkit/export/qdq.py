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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ExportError
from slimkit.io.onnx_graph import OnnxGraphIndex
from slimkit.quant.modules import FakeQuant, LayerAttrs, QuantLayer

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


class _Graph(OnnxGraphIndex):
    """Index of an ONNX graph: initializers by name, producer and consumers of each value."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        self.init = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.init[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        super().__init__(model.graph)

    def const(self, name: str) -> np.ndarray | None:
        return self.init.get(name)

    def rename_input(self, old: str, new: str) -> None:
        for n in self.g.node:
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
        for o in self.g.output:
            if o.name == old:  # graph output: keep its name by an Identity
                self.g.node.append(_node("Identity", [new], [old]))

    def set_init(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.init[name] = value
        self.g.initializer.append(numpy_helper.from_array(value, name))

    def prune(self) -> None:
        """Drop nodes whose outputs nobody uses and initializers nobody reads."""
        outputs = {o.name for o in self.g.output}
        changed = True
        while changed:
            self.refresh()
            dead = [n for n in self.g.node
                    if not any(o in outputs or self.users(o) for o in n.output)]
            for n in dead:
                self.g.node.remove(n)
            changed = bool(dead)
        used = {i for n in self.g.node for i in n.input}
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        self.toposort()

    def toposort(self) -> None:
        """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
        ready = {i.name for i in self.g.input} | {t.name for t in self.g.initializer} | {""}
        pending, order = list(self.g.node), []
        while pending:
            rest = [n for n in pending if not all(i in ready for i in n.input)]
            now = [n for n in pending if all(i in ready for i in n.input)]
            if not now:
                raise ExportError("QDQ rewrite left a cycle or a dangling input in the graph")
            for n in now:
                ready.update(n.output)
            order += now
            pending = rest
        del self.g.node[:]
        self.g.node.extend(order)  # copies the messages: re-index them
        self.refresh()


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_{op}", **attrs)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _qparams(g: _Graph, node: Any) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scale, zero point, axis) of a Q/DQ node when they are constants."""
    scale = g.const(node.input[1])
    zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or zero is None:
        return None
    return scale, zero, int(_attr(node, "axis", 1))


def _resolve_identities(g: _Graph) -> int:
    """Identity nodes of constants (the exporter's de-duplicated scales): use the constant."""
    done = 0
    for n in list(g.g.node):
        if n.op_type == "Identity" and g.const(n.input[0]) is not None \
                and n.output[0] not in {o.name for o in g.g.output}:
            g.init[n.output[0]] = g.init[n.input[0]]
            g.rename_input(n.output[0], n.input[0])
            g.g.node.remove(n)
            done += 1
    g.refresh()
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


def _fold_weight_quantizers(g: _Graph) -> int:
    """QuantizeLinear(float constant) -> the int8 initializer it computes."""
    done = 0
    for n in list(g.g.node):
        if n.op_type != "QuantizeLinear" or g.const(n.input[0]) is None:
            continue
        qp = _qparams(g, n)
        if qp is None:
            continue
        codes = _quantize_np(g.const(n.input[0]), *qp)
        name = n.input[0] + "_quantized"
        g.set_init(name, codes)
        g.rename_input(n.output[0], name)
        g.g.node.remove(n)
        done += 1
    g.refresh()
    return done


def _dq_source(g: _Graph, value: str) -> tuple[Any, tuple] | None:
    node = g.producer.get(value)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    qp = _qparams(g, node)
    return (node, qp) if qp is not None else None


def _quantize_biases(g: _Graph) -> int:
    """Float bias of a Conv/Gemm fed by DQ(x), DQ(W) -> DQ(int32 bias, s_x * s_w)."""
    done = 0
    for n in list(g.g.node):
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3:
            continue
        bias = g.const(n.input[2])
        x, w = _dq_source(g, n.input[0]), _dq_source(g, n.input[1])
        if bias is None or x is None or w is None or g.const(w[0].input[0]) is None:
            continue
        if n.op_type == "Gemm" and (not _attr(n, "transB", 0) or _attr(n, "alpha", 1.0) != 1.0
                                    or _attr(n, "beta", 1.0) != 1.0 or bias.ndim != 1):
            continue
        s_x, s_w = x[1][0].astype(np.float32), w[1][0].astype(np.float32)
        w_ndim = g.const(w[0].input[0]).ndim
        if s_x.size != 1 or (s_w.size > 1 and w[1][2] % w_ndim != 0):
            continue  # per-channel activations or weights not per output channel
        scale = (s_x.reshape(()) * s_w.reshape(-1)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy()
        q = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1)
        # Named after the consuming node: the exporter merges equal bias tensors (all-zero
        # biases after BN folding, a layer called twice), and each consumer gets its own scale.
        base = f"{n.output[0]}_bias"
        g.set_init(base + "_int32", q.astype(np.int32))
        g.set_init(base + "_scale", scale)
        g.set_init(base + "_zero", np.zeros(bias.shape, np.int32))
        out = base + "_dq"
        g.g.node.append(_node("DequantizeLinear", [base + "_int32", base + "_scale",
                                                   base + "_zero"], [out], axis=0))
        n.input[2] = out
        done += 1
    g.refresh()
    return done


def _drop_redundant_relus(g: _Graph) -> int:
    """Relu(DQ(q)) with the zero point at the lowest code is the identity: remove it."""
    done = 0
    for n in list(g.g.node):
        if n.op_type != "Relu":
            continue
        src = _dq_source(g, n.input[0])
        if src is None:
            continue
        zero = src[1][1]
        if np.all(zero.astype(np.int64) == np.iinfo(zero.dtype).min):
            g.rename_input(n.output[0], n.input[0])
            g.g.node.remove(n)
            done += 1
    g.refresh()
    return done


def _same(a: tuple, b: tuple) -> bool:
    return (a[0].shape == b[0].shape and np.array_equal(a[0], b[0])
            and a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1])
            and (a[0].size == 1 or a[2] == b[2]))


def _drop_requantize(g: _Graph) -> int:
    """DQ -> Q with the same qparams returns the codes it was given: bypass both."""
    done = 0
    for n in list(g.g.node):
        if n.op_type != "QuantizeLinear":
            continue
        src = _dq_source(g, n.input[0])
        qp = _qparams(g, n)
        if src is None or qp is None or not _same(src[1], qp):
            continue
        g.rename_input(n.output[0], src[0].input[0])
        g.g.node.remove(n)
        done += 1
    g.refresh()
    return done


def _move_requantize_through_shape_ops(g: _Graph) -> int:
    """DQ -> (MaxPool | Flatten | Reshape) -> Q with equal qparams: run the op on the codes.

    Max pooling commutes with the monotone map from codes to values, and shape ops move
    elements without touching them, so ``Q(op(DQ(q))) == op(q)`` exactly.
    """
    done = 0
    for n in list(g.g.node):
        if n.op_type not in ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze",
                             "Unsqueeze"):
            continue
        src = _dq_source(g, n.input[0])
        users = g.users(n.output[0])
        if src is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        qp = _qparams(g, users[0])
        if qp is None or not _same(src[1], qp) or src[1][0].size != 1:
            continue
        n.input[0] = src[0].input[0]
        g.rename_input(users[0].output[0], n.output[0])
        g.g.node.remove(users[0])
        done += 1
    g.refresh()
    return done


def _pin_quantizers_after_float_pools(g: _Graph) -> int:
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
    for n in list(g.g.node):
        users = g.users(n.output[0])
        if n.op_type != "MaxPool" or len(users) != 1 or users[0].op_type != "QuantizeLinear" \
                or _dq_source(g, n.input[0]):
            continue
        q = users[0]
        qp = _qparams(g, q)
        if qp is None or qp[0].size != 1:
            continue
        scale, zero = float(qp[0].reshape(())), float(qp[1].reshape(()))
        info = np.iinfo(qp[1].dtype)
        lo = (info.min - zero) * scale + scale / 4
        hi = (info.max - zero) * scale - scale / 4
        base = q.input[0]
        g.set_init(base + "_clip_lo", np.array(lo, np.float32))
        g.set_init(base + "_clip_hi", np.array(hi, np.float32))
        g.g.node.append(_node("Clip", [base, base + "_clip_lo", base + "_clip_hi"],
                              [base + "_pinned"]))
        q.input[0] = base + "_pinned"
        done += 1
    g.refresh()
    return done


#: Ops the rewrite evaluates when all their inputs are constants: the exporter leaves the
#: arithmetic of a padding computed in Python (TF "SAME" padding) as Concat/Slice/Cast nodes.
_CONST_OPS = ("Cast", "Reshape", "Transpose", "Slice", "Concat", "ConstantOfShape", "Unsqueeze",
              "Squeeze", "Gather", "Identity")


def _fold_constant_ops(g: _Graph) -> int:
    """Nodes of :data:`_CONST_OPS` whose inputs are all constants -> their value (computed by
    ONNX's reference evaluator), so the rewrites below can read pads and bounds."""
    from onnx.reference import ReferenceEvaluator

    outputs, done = {o.name for o in g.g.output}, 0
    for n in list(g.g.node):
        names = [i for i in n.input if i]
        if n.op_type not in _CONST_OPS or not names or any(g.const(i) is None for i in names) \
                or any(o in outputs for o in n.output):
            continue
        values = ReferenceEvaluator(n).run(None, {i: g.const(i) for i in names})
        for name, value in zip(n.output, values, strict=True):
            g.set_init(name, np.asarray(value))
        g.g.node.remove(n)
        done += 1
    g.refresh()
    return done


def _zero_spatial_pads(g: _Graph, n: Any) -> np.ndarray | None:
    """The ``[begin..., end...]`` spatial pads of a constant-zero ``Pad`` of N, C, spatial."""
    if n.op_type != "Pad" or _attr(n, "mode", b"constant") not in (b"constant", "constant") \
            or (len(n.input) > 3 and n.input[3]):
        return None
    pads = g.const(n.input[1])
    value = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(())
    if pads is None or value is None or np.any(value != 0) or pads.size < 6 or np.any(pads < 0):
        return None
    rank = pads.size // 2
    if np.any(pads[:2]) or np.any(pads[rank:rank + 2]):
        return None
    return np.concatenate([pads[2:rank], pads[rank + 2:]]).astype(np.int64)


def _fold_pads_into_convs(g: _Graph) -> int:
    """Zero ``Pad -> [Q -> DQ] -> Conv`` -> ``[Q -> DQ] -> Conv`` with the pads in the Conv.

    Exact: the Conv pads with zeros, and a quantizer maps 0 to its zero point, which
    dequantizes to 0 again. Without it a float Pad sits between two integer convolutions
    (TF "SAME" padding of Hugging Face MobileNetV2) and ONNX Runtime runs it on NCHW data.
    """
    from onnx import helper

    outputs, done = {o.name for o in g.g.output}, 0
    for n in list(g.g.node):
        pads = _zero_spatial_pads(g, n)
        users = g.users(n.output[0])
        if pads is None or not users or n.output[0] in outputs:
            continue
        head, tensors = None, [n.output[0]]
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            head = users[0]
            dqs = g.users(head.output[0])
            if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs
                              for d in dqs) or head.output[0] in outputs:
                continue
            tensors = [d.output[0] for d in dqs]
        convs = [c for t in tensors for c in g.users(t)]
        if not convs or any(c.op_type != "Conv" or c.input[0] not in tensors
                            or _attr(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                            for c in convs):
            continue
        for c in convs:
            old = np.asarray(_attr(c, "pads", [0] * pads.size), np.int64)
            if old.size != pads.size:
                break
            keep = [a for a in c.attribute if a.name != "pads"]
            del c.attribute[:]
            c.attribute.extend(keep + [helper.make_attribute("pads", (old + pads).tolist())])
        else:
            if head is not None:
                head.input[0] = n.input[0]
            else:
                for c in convs:
                    c.input[0] = n.input[0]
            g.g.node.remove(n)
            done += 1
        g.refresh()
    return done


def _drop_clips_on_codes(g: _Graph) -> int:
    """``DQ -> Clip`` that changes no dequantized code, or whose change the following
    quantizers (same qparams) round away, checked on every code: bypass the Clip.

    A ReLU6 between two integer convolutions whose shared quantizer ends at or below 6 is
    then gone, and ``Conv -> Q`` fuses (ONNX Runtime's own Clip/Q fusion would need the Clip
    right before the Q).
    """
    done = 0
    for n in list(g.g.node):
        src = _dq_source(g, n.input[0]) if n.op_type == "Clip" else None
        if src is None or src[1][0].size != 1:
            continue
        bounds = [g.const(n.input[k]) if len(n.input) > k and n.input[k] else False
                  for k in (1, 2)]
        if any(b is None for b in bounds):
            continue
        scale, zero = src[1][0].reshape(()), src[1][1].reshape(())
        info = np.iinfo(zero.dtype)
        codes = np.arange(info.min, info.max + 1)
        vals = ((codes - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32)
        lo = -np.inf if bounds[0] is False else float(bounds[0])
        hi = np.inf if bounds[1] is False else float(bounds[1])
        clipped = np.clip(vals, lo, hi).astype(np.float32)
        users = g.users(n.output[0])
        same_q = bool(users) and all(u.op_type == "QuantizeLinear" and _qparams(g, u) is not None
                                     and _same(src[1], _qparams(g, u)) for u in users)
        requant = _quantize_np(clipped, scale, zero, 0).astype(np.int64)
        if np.array_equal(clipped, vals) or (same_q and np.array_equal(requant, codes)):
            g.rename_input(n.output[0], n.input[0])
            g.g.node.remove(n)
            done += 1
    g.refresh()
    return done


def rewrite_qdq(model: Any) -> dict[str, int]:
    """Rewrite an exported fake-quant graph in place into ORT's integer-kernel QDQ form.

    Returns:
        How many rewrites of each kind were made.

    Example:
        >>> stats = rewrite_qdq(onnx.load("exported.onnx"))  # doctest: +SKIP
    """
    g = _Graph(model)
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
    g.prune()
    stats["float_pools_pinned"] = _pin_quantizers_after_float_pools(g)
    g.prune()
    return stats


def postprocess_qdq(path: str | Path) -> dict[str, int]:
    """Load ``path``, :func:`rewrite_qdq` it, check it and save it back (same path).

    Raises:
        ExportError: the rewritten graph fails the ONNX checker.
    """
    import onnx

    model = onnx.load(str(path))
    stats = rewrite_qdq(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"QDQ rewrite of '{path}' produced an invalid graph: "
                          f"{str(exc).splitlines()[0]}") from exc
    onnx.save(model, str(path))
    return stats


# ------------------------------------------------------------------------------- inspection


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

    import onnx

    from slimkit.io.onnx_model import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(onnx_path, threads, optimized_path=opt)
        graph = onnx.load(str(opt)).graph
    counts = Counter(n.op_type for n in graph.node)
    index = OnnxGraphIndex(graph)
    floats, fallbacks = [], []
    for n in graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        floats.append(n.name or n.output[0])
        fed_dq = any(index.producer_op(i) == "DequantizeLinear" for i in n.input)
        if fed_dq:  # the integer chain was broken here: dequantize, float compute
            fallbacks.append(n.name or n.output[0])
    int8 = sum(c for op, c in counts.items() if op in INT8_OPS)
    return {"op_counts": dict(sorted(counts.items())), "int8_nodes": int8,
            "float_compute": floats, "float_fallbacks": fallbacks,
            "all_int8": not floats and int8 > 0}
