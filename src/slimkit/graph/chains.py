"""Read-only dataflow queries for quantization: what follows a layer, which BatchNorm folds.

The graph comes from ``torch.fx.symbolic_trace``; a model it cannot trace (Hugging Face models,
whose forward branches on its inputs and config) is captured with ``torch.export`` instead when
an example batch is given (aten ops; each op of a Conv, Linear, BatchNorm or ReLU module is
mapped back to that module through its ``nn_module_stack``). Without either graph the queries
return None and callers fall back to a conservative treatment (every layer quantizes its own
output, no folding), recording why (:func:`flow_error`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

#: Modules that move values without changing them (``op(Q(x)) == Q(op(x))`` for any affine Q).
SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                 nn.MaxPool3d)
SHAPE_FUNCTIONS = (torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout,
                   torch.reshape)
SHAPE_METHODS = ("flatten", "view", "reshape", "contiguous")
#: ReLU commutes with a quantizer only when the zero point is the lowest code. ReLU6 (a
#: Hardtanh from 0) too, when the quantizer's range ends at or below its upper bound, which a
#: range observed after it does: then ``Q(relu6(y)) == relu6(DQ(Q(y)))`` code for code.
RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = (torch.relu, F.relu, F.relu6)
RELU_METHODS = ("relu",)
#: aten ops (``torch.export`` graphs) of the same three kinds, by overload packet name.
ATEN_SHAPE = {"view", "reshape", "_unsafe_view", "flatten", "clone", "contiguous", "dropout",
              "alias", "max_pool1d", "max_pool2d", "max_pool3d", "detach"}
ATEN_RELU = {"relu", "relu_"}
ATEN_CLIP = {"hardtanh", "hardtanh_", "relu6"}
#: The aten op each module type computes its output with (``torch.export`` graphs).
MODULE_OPS: dict[tuple[type[nn.Module], ...], set[str]] = {
    (nn.Conv1d, nn.Conv2d, nn.Conv3d): {"conv1d", "conv2d", "conv3d", "convolution",
                                        "_convolution"},
    (nn.Linear,): {"linear"},
    (nn.modules.batchnorm._BatchNorm,): {"batch_norm"},
    (nn.ReLU,): ATEN_RELU,
    (nn.ReLU6, nn.Hardtanh): ATEN_CLIP,
}


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``symbolic_trace(model)``, or None when the model is not traceable."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "unknown graph"
        return None


@dataclass
class Flow:
    """A dataflow graph whose nodes name the module they call (``module_of``), if any."""

    graph: fx.Graph
    root: nn.Module
    module_of: dict[fx.Node, str]
    source: str  # "fx" or "export"
    calls: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.module_of.values():
            self.calls[name] = self.calls.get(name, 0) + 1

    def module(self, node: fx.Node) -> nn.Module | None:
        name = self.module_of.get(node)
        return None if name is None else self.root.get_submodule(name)

    def label(self, node: fx.Node) -> str:
        return self.module_of.get(node, node.name)


def _aten_name(target: Any) -> str | None:
    packet = getattr(target, "overloadpacket", None)
    return None if packet is None else packet.__name__


def _export_flow(model: nn.Module, example: Any) -> Flow:
    from slimkit.graph.dependency import capture

    ep = capture(model, example)
    module_of = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        op = _aten_name(node.target)
        if any(isinstance(mod, types) and op in ops for types, ops in MODULE_OPS.items()):
            module_of[node] = path
    return Flow(ep.graph, model, module_of, "export")


def flow(model: nn.Module, example: Any = None) -> tuple[Flow | None, str | None]:
    """The model's dataflow: fx first, then ``torch.export`` on ``example`` (a batch).

    Returns:
        ``(flow, None)``, or ``(None, why)`` when neither capture works.
    """
    gm = trace(model)
    if gm is not None:
        return Flow(gm.graph, gm, {n: str(n.target) for n in gm.graph.nodes
                                   if n.op == "call_module"}, "fx"), None
    if example is None:
        return None, ("torch.fx cannot trace the model and no example batch was given for "
                      "torch.export")
    # One capture serves the queries PTQ makes in a row on an unchanged structure (links,
    # shared outputs, residual adds); a module swapped in or out (BatchNorm folded, a layer
    # wrapped) changes the key. Only the latest capture is kept.
    key = (id(model), tuple((n, type(m)) for n, m in model.named_modules()),
           tuple((tuple(t.shape), t.dtype) for t in _leaves(example)))
    if _LAST and _LAST[0] == key:
        return _LAST[1], None
    try:
        fl = _export_flow(model, example)
    except Exception as exc:  # noqa: BLE001 - recorded by the caller as the reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return None, f"neither torch.fx nor torch.export could capture the model: {first}"
    _LAST[:] = [key, fl]
    return fl, None


_LAST: list[Any] = []


def _leaves(example: Any) -> list[torch.Tensor]:
    from slimkit.io import batch as B

    return [t for t in B.leaves(example) if isinstance(t, torch.Tensor)]


def flow_error(model: nn.Module, example: Any = None) -> str | None:
    """Why :func:`flow` finds no graph for ``model`` (None when it finds one)."""
    return flow(model, example)[1]


def _clip_max(node: fx.Node, mod: nn.Module | None) -> float | None | bool:
    """For a ReLU-like node: its upper bound (None: unbounded); False when not ReLU-like."""
    if isinstance(mod, nn.ReLU):
        return None
    if isinstance(mod, nn.Hardtanh):  # ReLU6 included
        return float(mod.max_val) if mod.min_val == 0 else False
    name = _aten_name(node.target) if node.op == "call_function" else None
    if node.target in RELU_FUNCTIONS[:2] or name in ATEN_RELU or (
            node.op == "call_method" and node.target in RELU_METHODS):
        return None
    if node.target is F.relu6 or name == "relu6":
        return 6.0
    if name in ("hardtanh", "hardtanh_"):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(hi) if lo == 0 else False
    return False


def _is_zero_pad(node: fx.Node) -> bool:
    """``F.pad`` / ``aten.pad`` with constant zeros: ``Q(pad(x)) == pad(Q(x))`` since an
    affine quantizer represents 0 exactly (as its zero point)."""
    name = _aten_name(node.target) if node.op == "call_function" else None
    if node.target is not F.pad and name not in ("pad", "constant_pad_nd"):
        return False
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if name == "constant_pad_nd":
        mode = "constant"
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if name == "constant_pad_nd":
        value = node.args[2] if len(node.args) > 2 else 0
    return mode == "constant" and (value is None or value == 0)


def _kind(fl: Flow, node: fx.Node) -> str | None:
    """``"shape"``, ``"relu"`` or None for a node that is neither."""
    mod = fl.module(node) if node.op in ("call_module", "call_function") else None
    if node.op == "call_module":
        if _clip_max(node, mod) is not False:
            return "relu"
        return "shape" if isinstance(mod, SHAPE_MODULES) else None
    if node.op == "call_function":
        if _clip_max(node, mod) is not False:
            return "relu"
        if node.target in SHAPE_FUNCTIONS or _aten_name(node.target) in ATEN_SHAPE \
                or _is_zero_pad(node):
            return "shape"
    if node.op == "call_method":
        if node.target in RELU_METHODS:
            return "relu"
        if node.target in SHAPE_METHODS:
            return "shape"
    return None


def output_links(model: nn.Module, layers: set[str],
                 example: Any = None) -> dict[str, dict[str, Any]] | None:
    """For each layer in ``layers``: the layer its output reaches through value-preserving ops.

    Follows the single user of each layer's output while it is a shape op, max pooling, a
    zero padding or a ReLU (ReLU6 too: ``clip_max`` then holds its upper bound). When the
    chain ends as the first input of another layer of ``layers``, that layer is the
    ``consumer`` (its input quantizer can serve as this layer's output quantizer, so ONNX
    Runtime sees ``Conv -> Q`` and fuses an integer kernel).

    Args:
        model: the model (not modified).
        layers: the layer names to link.
        example: a batch for ``torch.export`` when ``torch.fx`` cannot trace the model.

    Returns:
        ``{layer: {"consumer": name or None, "through": [op names], "relu": bool,
        "relu_module": name or None, "clip_max": float or None, "model_output": bool}}``
        (``relu_module``: the first ReLU module on the chain, when the model calls it only
        once, so hooking it observes this chain alone), or None when the model cannot be
        captured.
    """
    fl, _ = flow(model, example)
    if fl is None:
        return None
    out: dict[str, dict[str, Any]] = {}
    for node in fl.graph.nodes:
        name = fl.module_of.get(node)
        if name not in layers:
            continue
        cur, through, relu, relu_module, clip = node, [], False, None, None
        consumer, final = None, False
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if fl.module_of.get(user) in layers and user.args and user.args[0] is cur:
                consumer = fl.module_of[user]
                break
            if user.op == "output":
                final = True
                break
            kind = _kind(fl, user)
            if kind is None or (user.args and user.args[0] is not cur):
                break
            if kind == "relu":
                bound = _clip_max(user, fl.module(user))
                clip = bound if clip is None else min(clip, bound or clip)
                if not relu and user in fl.module_of and fl.calls[fl.module_of[user]] == 1:
                    relu_module = fl.module_of[user]
            relu = relu or kind == "relu"
            through.append(fl.label(user))
            cur = user
        out[name] = {"consumer": consumer, "through": through, "relu": relu,
                     "relu_module": relu_module, "clip_max": clip, "model_output": final}
    return out


def _is_add(node: fx.Node) -> bool:
    import operator

    return node.op == "call_function" and (
        node.target in (operator.add, torch.add) or _aten_name(node.target) == "add")


def _layer_through_shapes(fl: Flow, node: fx.Node, layers: set[str]) -> str | None:
    """The layer of ``layers`` that ``node`` (a user) leads to as its first input, through
    single-user shape ops and zero pads, or None."""
    prev = None
    while True:
        name = fl.module_of.get(node)
        if name in layers:
            return name if prev is None or (node.args and node.args[0] is prev) else None
        if _kind(fl, node) != "shape" or len(node.users) != 1 or (
                prev is not None and node.args and node.args[0] is not prev):
            return None
        prev, node = node, next(iter(node.users))


def _returned_by(fl: Flow, node: fx.Node) -> str | None:
    """The innermost module whose forward returns ``node`` (no user of it runs inside that
    module), from the ``nn_module_stack`` both tracers record; None at the top level."""
    def paths(n: fx.Node) -> list[str]:
        return [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]

    inside = [p for p in paths(node) if p]
    for path in reversed(inside):
        if not any(path in paths(u) for u in node.users):
            return path
    return None


def residual_outputs(model: nn.Module, layers: set[str],
                     example: Any = None) -> dict[str, dict[str, Any]] | None:
    """Residual adds that feed a layer of ``layers`` and other adds: where to quantize them.

    An add whose value goes to a quantized layer's input (through shape ops or zero pads) and
    to other adds (the next skip connection) can run as ONNX Runtime's integer add only when
    every reader takes the same quantized value: the add's output is then quantized with that
    layer's input qparams, at the output of the module that returns it.

    Returns:
        ``{module: {"consumer": layer, "op": node name}}`` for the adds some module returns
        (module called once), or None when the model cannot be captured.
    """
    fl, _ = flow(model, example)
    if fl is None:
        return None
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for node in fl.graph.nodes:
        if not _is_add(node) or len(node.users) < 1:
            continue
        found = [_layer_through_shapes(fl, u, layers) for u in node.users]
        consumers = {c for c in found if c is not None}
        others = [u for u, c in zip(node.users, found, strict=True) if c is None]
        if len(consumers) != 1 or not all(_is_add(u) for u in others):
            continue
        owner = _returned_by(fl, node)
        if owner is None or counts.get(id(model.get_submodule(owner)), 0) != 1:
            continue
        out[owner] = {"consumer": consumers.pop(), "op": node.name}
    return out


def shared_consumers(model: nn.Module, layers: set[str],
                     example: Any = None) -> dict[str, str] | None:
    """Layers whose output feeds one layer of ``layers`` (through shape ops, zero pads) and
    residual adds: ``{layer: consumer}``. Quantizing the output with the consumer's input
    qparams gives every reader, the adds too, the same quantized value (integer adds in ONNX
    Runtime). None when the model cannot be captured."""
    fl, _ = flow(model, example)
    if fl is None:
        return None
    out = {}
    for node in fl.graph.nodes:
        name = fl.module_of.get(node)
        if name not in layers:
            continue
        cur = node  # past single-user shape ops (a folded BatchNorm's Identity)
        while len(cur.users) == 1 and _kind(fl, nxt := next(iter(cur.users))) == "shape" \
                and nxt.args and nxt.args[0] is cur:
            cur = nxt
        if len(cur.users) < 2:
            continue
        found = [_layer_through_shapes(fl, u, layers) for u in cur.users]
        consumers = {c for c in found if c is not None}
        others = [u for u, c in zip(cur.users, found, strict=True) if c is None]
        if len(consumers) == 1 and others and all(_is_add(u) for u in others):
            out[name] = consumers.pop()
    return out


def bn_pairs(model: nn.Module, example: Any = None) -> list[tuple[str, str]] | None:
    """``(layer, batchnorm)`` pairs where a BatchNorm directly and only follows a Conv/Linear.

    Args:
        model: the model (not modified).
        example: a batch for ``torch.export`` when ``torch.fx`` cannot trace the model.

    Returns:
        The pairs in graph order, or None when the model cannot be captured.
    """
    return bn_analysis(model, example)[0]


def bn_analysis(model: nn.Module, example: Any = None,
                ) -> tuple[list[tuple[str, str]] | None, list[dict[str, str]]]:
    """:func:`bn_pairs`, and every BatchNorm that cannot fold with the reason.

    Returns:
        ``(pairs or None, [{"what": batchnorm, "why": reason}])``; with no graph the one
        entry says why the model could not be captured.
    """
    fl, why = flow(model, example)
    if fl is None:
        bns = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return None, ([{"what": f"{len(bns)} BatchNorm layer(s)", "why": f"not folded: {why}"}]
                      if bns else [])
    pairs, skipped, seen = [], [], {}
    for node in fl.graph.nodes:
        mod = fl.module(node) if node in fl.module_of else None
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not node.args:
            continue
        bn = fl.module_of[node]
        seen[bn] = seen.get(bn, 0) + 1
        prev = node.args[0]
        layer = fl.module(prev) if isinstance(prev, fx.Node) else None
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            skipped.append({"what": bn, "why": "not folded: its input is not the output of a "
                            "Conv/Linear"})
        elif len(prev.users) != 1 or fl.calls[fl.module_of[prev]] != 1 or fl.calls[bn] != 1:
            skipped.append({"what": bn, "why": f"not folded: the output of "
                            f"'{fl.module_of[prev]}' is also used elsewhere, or one of them "
                            "is called more than once"})
        else:
            pairs.append((fl.module_of[prev], bn))
    unseen = [n for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in seen]
    skipped += [{"what": n, "why": "not folded: not found in the captured graph"}
                for n in unseen]
    return pairs, skipped


def norm_consumers(model: nn.Module) -> dict[str, list[str]] | None:
    """LayerNorms whose output goes only to Linear layers (as their input): ``{norm: [linears]}``.

    Such a norm's per-channel affine weights can absorb a scale that the linears undo
    (SmoothQuant). Returns None when the model cannot be traced.
    """
    gm = trace(model)
    if gm is None:
        return None
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)),
                                                      nn.LayerNorm):
            continue
        users = list(node.users)
        if users and all(u.op == "call_module" and u.args and u.args[0] is node
                         and isinstance(gm.get_submodule(str(u.target)), nn.Linear)
                         for u in users):
            out[str(node.target)] = [str(u.target) for u in users]
    return out
