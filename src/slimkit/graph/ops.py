"""How each aten op moves channel labels from its inputs to its output (one Registry).

A handler gets the op's node, its arguments with tensors replaced by their labels, and returns
the labels of the output (a list of per-dimension label arrays, or a tuple of them for ops with
several outputs). Ops missing from :data:`OP_RULES` are handled conservatively: any prunable
label reaching them is locked and the op is reported by ``analyze``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slimkit.core.registry import Registry
from slimkit.graph.labels import Labels, LabelSet, reshape, static


@dataclass
class SplitLog:
    """What the walk notes about attention-like splits (shared by every rule of one walk).

    Attributes:
        unit: ``"heads"``: a labelled dim split into (units, inner) is pruned by whole units
            (heads); ``"inner"``: by inner position, the same one in every unit (head dims).
        splits: ``(module, labels of the coarsened dim)`` per split: the module may hold that
            size in an attribute (a head count, or a head size).
        queries: ``(module, node, labels)``: the left operand of a contraction of two labelled
            dims (the queries of ``q @ k^T`` / SDPA) and the contracted labels; ``inner`` mode.
        fused: ``(module, pieces)``: a labelled dim split into equal pieces of a size fixed at
            trace time (GPT-2's ``c_attn(x).split(self.split_size, dim=2)`` into q, k, v). The
            analysis decides: pruned alike when the module holds that size in an attribute the
            slicer keeps up to date and every piece is split into heads; locked otherwise.
    """

    unit: str = "heads"
    splits: list[tuple[str, np.ndarray]] = field(default_factory=list)
    queries: list[tuple[str, torch.fx.Node, np.ndarray]] = field(default_factory=list)
    fused: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)


@dataclass
class OpContext:
    """What a rule may use: the label store, the node's module and op names, and its shapes."""

    ls: LabelSet
    node: torch.fx.Node
    module: str
    op: str
    log: SplitLog = field(default_factory=SplitLog)

    def out_shape(self, i: int | None = None) -> list[int]:
        val = self.node.meta.get("val")
        if i is not None:
            val = val[i]
        return [int(s) for s in val.shape]

    def unite(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.ls.unite(a, b, self.module, self.op)

    def lock(self, a: np.ndarray, why: str) -> None:
        self.ls.lock(a, self.module, self.op, why)


Rule = Callable[[OpContext, list[Any]], Any]
OP_RULES: Registry[Rule] = Registry("op rule")


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for aten op packets ``names`` (``conv2d``, ``add``...)."""

    def add(fn: Rule) -> Rule:
        for n in names:
            OP_RULES.register(n, fn)
        return fn

    return add


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


@rule("relu", "relu_", "gelu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "silu", "silu_",
      "hardswish", "hardsigmoid", "leaky_relu", "elu", "dropout", "clone", "contiguous", "alias",
      "detach", "_to_copy", "to", "softmax", "log_softmax", "_softmax", "neg", "sqrt", "rsqrt",
      "exp", "log", "abs", "erf", "zeros_like", "ones_like", "full_like", "relu6", "mish",
      "softplus", "lift_fresh_copy", "type_as", "clamp", "clamp_min", "clamp_max", "square",
      "reciprocal", "cos", "sin", "_assert_tensor_metadata")
def _unary(ctx: OpContext, args: list[Any]) -> Labels:
    return [a.copy() for a in args[0]] if isinstance(args[0], list) else static(ctx.out_shape())


@rule("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "where", "maximum", "minimum",
      "pow", "masked_fill", "eq", "ne", "lt", "gt", "le", "ge", "rsub", "floor_divide",
      "logical_and", "logical_or", "bitwise_and", "bitwise_or", "fmod", "remainder", "atan2")
def _broadcast(ctx: OpContext, args: list[Any]) -> Labels:
    shape = ctx.out_shape()
    return _align(ctx, [a for a in args if _is_tensor_labels(a)], shape)


def _align(ctx: OpContext, tensors: list[Labels], shape: list[int]) -> Labels:
    """Right-aligned broadcasting: positions of equal-size dims are removed together."""
    out: list[np.ndarray | None] = [None] * len(shape)
    for t in tensors:
        for k, lab in enumerate(t):
            d = len(shape) - len(t) + k
            if d < 0:
                continue
            if len(lab) == shape[d]:
                out[d] = lab.copy() if out[d] is None else ctx.unite(out[d], lab)
            else:
                ctx.lock(lab, "broadcast from size 1")
    return [o if o is not None else static([s])[0] for o, s in zip(out, shape, strict=True)]


def _is_tensor_labels(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(a, np.ndarray) for a in x)


@rule("conv1d", "conv2d", "conv3d")
def _conv(ctx: OpContext, args: list[Any]) -> Labels:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    groups = int(args[6]) if len(args) > 6 else 1
    if _is_tensor_labels(b):
        ctx.unite(w[0], b[0])
    if groups == 1:
        ctx.unite(x[1], w[1])
    else:
        # Grouped/depthwise: a whole group (its inputs and its outputs) is one unit.
        cin_g, cout_g = len(w[1]), len(w[0]) // groups
        for k in range(groups):
            ctx.ls.unite_all(np.concatenate([x[1][k * cin_g:(k + 1) * cin_g],
                                             w[0][k * cout_g:(k + 1) * cout_g]]))
            if ((x[1][k * cin_g:(k + 1) * cin_g] < 0).any()):
                ctx.lock(w[0][k * cout_g:(k + 1) * cout_g], "grouped conv on a fixed input")
    shape = ctx.out_shape()
    return [x[0].copy(), w[0].copy(), *static(shape[2:])]


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(ctx: OpContext, args: list[Any]) -> Labels:
    x, w = args[0], args[1]  # weight: [C_in, C_out / groups, k...]
    b = args[2] if len(args) > 2 else None
    groups = int(args[6]) if len(args) > 6 else 1
    if groups != 1:
        for lab in (x[1], w[0], w[1]):
            ctx.lock(lab, "grouped transposed conv")
        return static(ctx.out_shape())
    ctx.unite(x[1], w[0])
    if _is_tensor_labels(b):
        ctx.unite(w[1], b[0])
    return [x[0].copy(), w[1].copy(), *static(ctx.out_shape()[2:])]


@rule("linear")
def _linear(ctx: OpContext, args: list[Any]) -> Labels:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    ctx.unite(x[-1], w[1])
    if _is_tensor_labels(b):
        ctx.unite(w[0], b[0])
    return [a.copy() for a in x[:-1]] + [w[0].copy()]


@rule("matmul", "mm", "bmm")
def _matmul(ctx: OpContext, args: list[Any]) -> Labels:
    a, b = args[0], args[1]
    if len(a) < 2 or len(b) < 2:
        for t in (a, b):
            for lab in t:
                ctx.lock(lab, "matmul with a vector")
        return static(ctx.out_shape())
    _note_query(ctx, a[-1], b[-2])
    ctx.unite(a[-1], b[-2])
    shape = ctx.out_shape()
    batch = _align(ctx, [a[:-2], b[:-2]], shape[:-2])
    return [*batch, a[-2].copy(), b[-1].copy()]


@rule("addmm")
def _addmm(ctx: OpContext, args: list[Any]) -> Labels:
    bias, a, b = args[0], args[1], args[2]
    ctx.unite(a[-1], b[-2])
    if _is_tensor_labels(bias):
        ctx.unite(bias[-1], b[-1])
    return [a[0].copy(), b[-1].copy()]


@rule("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm")
def _batch_norm(ctx: OpContext, args: list[Any]) -> Any:
    x = args[0]
    for p in args[1:5]:
        if _is_tensor_labels(p):
            ctx.unite(x[1], p[0])
    out = [a.copy() for a in x]
    if ctx.op == "_native_batch_norm_legit_no_training":
        return (out, static([0]), static([0]))
    return out


@rule("layer_norm", "rms_norm")
def _layer_norm(ctx: OpContext, args: list[Any]) -> Labels:
    x, shape = args[0], list(args[1])
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    k = len(shape)
    for i in range(k):
        d = len(x) - k + i
        if _is_tensor_labels(w):
            ctx.unite(x[d], w[i])
            if _is_tensor_labels(b):
                ctx.unite(w[i], b[i])
        else:
            ctx.lock(x[d], "norm without affine weight normalizes over a fixed shape")
    return [a.copy() for a in x]


@rule("group_norm")
def _group_norm(ctx: OpContext, args: list[Any]) -> Labels:
    x, groups = args[0], int(args[1])
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    size = len(x[1]) // groups
    for g in range(groups):
        sl = slice(g * size, (g + 1) * size)
        parts = [x[1][sl]] + [p[0][sl] for p in (w, b) if _is_tensor_labels(p)]
        ctx.ls.unite_all(np.concatenate(parts))
        if (x[1][sl] < 0).any():
            for p in parts:
                ctx.lock(p, "group norm on a fixed input")
    return [a.copy() for a in x]


@rule("embedding")
def _embedding(ctx: OpContext, args: list[Any]) -> Labels:
    w, idx = args[0], args[1]
    return [a.copy() for a in idx] + [w[1].copy()]


@rule("scaled_dot_product_attention")
def _sdpa(ctx: OpContext, args: list[Any]) -> Labels:
    q, k, v = args[0], args[1], args[2]
    _note_query(ctx, q[-1], k[-1])
    ctx.unite(q[-1], k[-1])
    for t in (k, v):
        for d in range(len(q) - 2):
            if len(t[d]) == len(q[d]):
                ctx.unite(q[d], t[d])
    if len(args) > 3 and _is_tensor_labels(args[3]):
        for lab in args[3]:
            ctx.lock(lab, "attention mask")
    return [a.copy() for a in q[:-1]] + [v[-1].copy()]


def _note_query(ctx: OpContext, a: np.ndarray, b: np.ndarray) -> None:
    """In ``inner`` mode, note the left operand of a contraction of two labelled dims."""
    if ctx.log.unit == "inner" and (a >= 0).any() and (b >= 0).any():
        node = ctx.node.args[0]
        if isinstance(node, torch.fx.Node):
            ctx.log.queries.append((ctx.module, node, a.copy()))


@rule("mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
      "argmax", "argmin")
def _reduce(ctx: OpContext, args: list[Any]) -> Any:
    x = args[0]
    shape = ctx.node.meta.get("val")
    if not isinstance(shape, torch.Tensor):  # max.dim / min.dim return (values, indices)
        out = _reduce_to(ctx, x, args, ctx.out_shape(0))
        return (out, [a.copy() for a in out])
    return _reduce_to(ctx, x, args, ctx.out_shape())


def _reduce_to(ctx: OpContext, x: Labels, args: list[Any], shape: list[int]) -> Labels:
    dims = args[1] if len(args) > 1 else None
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return static(shape)
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {_dim(int(d), len(x)) for d in dims}
    keep = len(shape) == len(x)
    out = []
    for d, lab in enumerate(x):
        if d in dims:
            if keep:
                out.append(static([1])[0])
        else:
            out.append(lab.copy())
    return out


@rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
      "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d",
      "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle")
def _pool(ctx: OpContext, args: list[Any]) -> Any:
    x = args[0]
    val = ctx.node.meta.get("val")
    if ctx.op == "pixel_shuffle":
        for lab in x[1:]:
            ctx.lock(lab, "pixel_shuffle mixes channels into space")
    if isinstance(val, (tuple, list)):
        out = [x[0].copy(), x[1].copy(), *static(ctx.out_shape(0)[2:])]
        return tuple([a.copy() for a in out] for _ in val)
    shape = ctx.out_shape()
    return [x[0].copy(), x[1].copy() if len(x[1]) == shape[1] else static([shape[1]])[0],
            *static(shape[2:])]


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as")
def _view(ctx: OpContext, args: list[Any]) -> Labels:
    coarsened: list[np.ndarray] = []
    out = reshape(ctx.ls, args[0], ctx.out_shape(), ctx.module, ctx.op, coarsened,
                  ctx.log.unit)
    # A labelled dim split into (units, inner): the module may hold the unit count (heads) or
    # the inner size (head size) in an attribute.
    ctx.log.splits += [(ctx.module, lab) for lab in coarsened]
    return out


@rule("permute")
def _permute(ctx: OpContext, args: list[Any]) -> Labels:
    x, perm = args[0], [_dim(int(p), len(args[0])) for p in args[1]]
    return [x[p].copy() for p in perm]


@rule("transpose", "swapaxes")
def _transpose(ctx: OpContext, args: list[Any]) -> Labels:
    x = [a.copy() for a in args[0]]
    a, b = _dim(int(args[1]), len(x)), _dim(int(args[2]), len(x))
    x[a], x[b] = x[b], x[a]
    return x


@rule("t")
def _t(ctx: OpContext, args: list[Any]) -> Labels:
    return [a.copy() for a in reversed(args[0])]


@rule("unsqueeze")
def _unsqueeze(ctx: OpContext, args: list[Any]) -> Labels:
    x = [a.copy() for a in args[0]]
    d = _dim(int(args[1]), len(x) + 1)
    return x[:d] + static([1]) + x[d:]


@rule("squeeze")
def _squeeze(ctx: OpContext, args: list[Any]) -> Labels:
    x = args[0]
    shape = ctx.out_shape()
    dims = args[1] if len(args) > 1 else None
    if dims is None:
        dims = [d for d, lab in enumerate(x) if len(lab) == 1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {_dim(int(d), len(x)) for d in dims if len(x[_dim(int(d), len(x))]) == 1}
    out = [lab.copy() for d, lab in enumerate(x) if d not in dims]
    return out if len(out) == len(shape) else static(shape)


@rule("expand", "expand_as", "repeat")
def _expand(ctx: OpContext, args: list[Any]) -> Labels:
    x = args[0]
    shape = ctx.out_shape()
    out = static(shape)
    off = len(shape) - len(x)
    for k, lab in enumerate(x):
        if len(lab) == shape[off + k] and (ctx.op != "repeat" or len(lab) == 1):
            out[off + k] = lab.copy()
        else:
            ctx.lock(lab, "expanded or repeated")
    return out


@rule("select")
def _select(ctx: OpContext, args: list[Any]) -> Labels:
    x, d = args[0], _dim(int(args[1]), len(args[0]))
    ctx.lock(x[d], "select picks a fixed index")
    return [lab.copy() for k, lab in enumerate(x) if k != d]


@rule("slice")
def _slice(ctx: OpContext, args: list[Any]) -> Labels:
    x = [a.copy() for a in args[0]]
    d = _dim(int(args[1]) if len(args) > 1 else 0, len(x))
    size = ctx.out_shape()[d]
    if size != len(x[d]):
        ctx.lock(x[d], "sliced with fixed bounds")
        x[d] = static([size])[0]
    return x


@rule("cat", "concat")
def _cat(ctx: OpContext, args: list[Any]) -> Labels:
    parts = [t for t in args[0] if _is_tensor_labels(t) and len(t) > 0]
    n = len(parts[0])
    d = _dim(int(args[1]) if len(args) > 1 else 0, n)
    out = [a.copy() for a in parts[0]]
    for t in parts[1:]:
        for k in range(n):
            if k != d:
                out[k] = ctx.unite(out[k], t[k])
    out[d] = np.concatenate([t[d] for t in parts])
    return out


@rule("stack")
def _stack(ctx: OpContext, args: list[Any]) -> Labels:
    parts = list(args[0])
    d = _dim(int(args[1]) if len(args) > 1 else 0, len(parts[0]) + 1)
    out = [a.copy() for a in parts[0]]
    for t in parts[1:]:
        out = [ctx.unite(o, lab) for o, lab in zip(out, t, strict=True)]
    return out[:d] + static([len(parts)]) + out[d:]


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(ctx: OpContext, args: list[Any]) -> tuple:
    x = args[0]
    shapes = [list(v.shape) for v in ctx.node.meta["val"]]
    dim = args[2] if len(args) > 2 else 0
    if ctx.op == "unbind":
        dim = args[1] if len(args) > 1 else 0
    d = _dim(int(dim), len(x))
    sizes = [s[d] for s in shapes] if ctx.op != "unbind" else [1] * len(shapes)
    offsets = np.cumsum([0, *sizes])
    pieces = [x[d][offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    if ctx.op == "unbind":
        ctx.lock(x[d], "unbind picks fixed indices")
        return tuple([a.copy() for k, a in enumerate(x) if k != d] for _ in shapes)
    if ctx.op != "chunk" and (x[d] >= 0).any():
        # split(size)/split_with_sizes carry sizes fixed at trace time; chunk(n) adapts. Equal
        # pieces of a size the module holds (a fused q/k/v projection) are left to the
        # analysis, which knows the module (SplitLog.fused).
        if len(set(sizes)) == 1 and len(sizes) > 1:
            ctx.log.fused.append((ctx.module, [p.copy() for p in pieces]))
        else:
            ctx.lock(x[d], f"split into fixed sizes {sizes} (chunk(n) can be pruned)")
    elif len(set(sizes)) == 1:
        # Equal pieces stay equal only if the same positions go from every piece.
        for p in pieces[1:]:
            ctx.unite(pieces[0], p)
    else:
        ctx.lock(x[d], f"split into unequal sizes {sizes}")
    return tuple([a.copy() if k != d else pieces[i].copy() for k, a in enumerate(x)]
                 for i in range(len(sizes)))


@rule("pad", "constant_pad_nd", "reflection_pad2d", "replicate_pad2d")
def _pad(ctx: OpContext, args: list[Any]) -> Labels:
    x = [a.copy() for a in args[0]]
    pads = list(args[1])
    shape = ctx.out_shape()
    for i in range(0, len(pads), 2):
        d = len(x) - 1 - i // 2
        if pads[i] or pads[i + 1]:
            ctx.lock(x[d], "padded with a fixed amount")
            x[d] = static([shape[d]])[0]
    return x


@rule("getitem")
def _getitem(ctx: OpContext, args: list[Any]) -> Labels:
    seq, i = args[0], int(args[1])
    if isinstance(seq, (tuple, list)) and not _is_tensor_labels(seq) and i < len(seq) and \
            seq[i] is not None:
        return seq[i]
    return static(ctx.out_shape())


def unknown_rule(ctx: OpContext, args: list[Any]) -> Any:
    """Lock every prunable label an op without a rule touches; return static outputs."""
    for a in _flatten(args):
        ctx.lock(a, f"op {ctx.op} has no channel rule")
    val = ctx.node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(static(v.shape) if isinstance(v, torch.Tensor) else None for v in val)
    if isinstance(val, torch.Tensor):
        return static(val.shape)
    return None


def _flatten(args: Any) -> list[np.ndarray]:
    if isinstance(args, np.ndarray):
        return [args]
    if isinstance(args, (list, tuple)):
        return [a for x in args for a in _flatten(x)]
    return []
