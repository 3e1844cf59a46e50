"""Read-only dataflow queries for quantization: what follows a layer, which BatchNorm folds.

Uses ``torch.fx.symbolic_trace``; models it cannot trace get ``None`` and callers fall back to
a conservative treatment (every layer quantizes its own output, no folding).
"""

from __future__ import annotations

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
#: ReLU commutes with a quantizer only when the zero point is the lowest code.
RELU_MODULES = (nn.ReLU,)
RELU_FUNCTIONS = (torch.relu, F.relu)
RELU_METHODS = ("relu",)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``symbolic_trace(model)``, or None when the model is not traceable."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "unknown graph"
        return None


def _kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"shape"``, ``"relu"`` or None for a node that is neither."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, RELU_MODULES):
            return "relu"
        return "shape" if isinstance(mod, SHAPE_MODULES) else None
    if node.op == "call_function":
        if node.target in RELU_FUNCTIONS:
            return "relu"
        if node.target in SHAPE_FUNCTIONS:
            return "shape"
    if node.op == "call_method":
        if node.target in RELU_METHODS:
            return "relu"
        if node.target in SHAPE_METHODS:
            return "shape"
    return None


def output_links(model: nn.Module, layers: set[str]) -> dict[str, dict[str, Any]] | None:
    """For each layer in ``layers``: the layer its output reaches through value-preserving ops.

    Follows the single user of each layer's output while it is a shape op, max pooling or a
    ReLU. When the chain ends as the first input of another layer of ``layers``, that layer is
    the ``consumer`` (its input quantizer can serve as this layer's output quantizer, so ONNX
    Runtime sees ``Conv -> Q`` and fuses an integer kernel).

    Returns:
        ``{layer: {"consumer": name or None, "through": [op names], "relu": bool,
        "relu_module": name or None, "model_output": bool}}`` (``relu_module``: the first
        ReLU module on the chain, when the model calls it only once, so hooking it observes
        this chain alone), or None when the model cannot be traced.
    """
    gm = trace(model)
    if gm is None:
        return None
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in layers:
            continue
        cur, through, relu, relu_module = node, [], False, None
        consumer, final = None, False
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op == "call_module" and str(user.target) in layers \
                    and user.args and user.args[0] is cur:
                consumer = str(user.target)
                break
            if user.op == "output":
                final = True
                break
            kind = _kind(gm, user)
            if kind is None or (user.args and user.args[0] is not cur):
                break
            if kind == "relu" and not relu and user.op == "call_module" \
                    and calls[str(user.target)] == 1:
                relu_module = str(user.target)
            relu = relu or kind == "relu"
            through.append(str(user.target) if user.op == "call_module" else user.name)
            cur = user
        out[str(node.target)] = {"consumer": consumer, "through": through, "relu": relu,
                                 "relu_module": relu_module, "model_output": final}
    return out


def bn_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(layer, batchnorm)`` pairs where a BatchNorm directly and only follows a Conv/Linear.

    Returns:
        The pairs in graph order, or None when the model cannot be traced.
    """
    gm = trace(model)
    if gm is None:
        return None
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not node.args:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = gm.get_submodule(str(prev.target))
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            pairs.append((str(prev.target), str(node.target)))
    return pairs


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
