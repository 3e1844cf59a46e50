"""Dependency graph for structured pruning: which tensor slices must be removed together.

The graph comes from the model itself (``torch.export.export(..., strict=False)``: aten ops,
parameter placeholders named ``module.param``, ``nn_module_stack`` on every node), so it works
on models users write, not on per-architecture rules. Channel labels are propagated through
every op (see :mod:`slimkit.graph.labels` and the rules in :mod:`slimkit.graph.ops`); the
labels that end up united form one prunable *channel*, and channels that touch the same
parameters form a *group*. Removing channel ``i`` of a group removes, for every member
``(param, dim)``, the indices ``members[k].indices[i]``: a conv's output row and bias, the
BatchNorm entries and running stats, the next conv's input column, both sides of a residual
add, ``H*W`` columns of a Linear after ``flatten``, a whole attention head of q/k/v/out...

Read-only: the model is captured in eval mode and its mode is restored; nothing is mutated.

Example:
    >>> graph = build_dependency_graph(model, (torch.randn(1, 3, 32, 32),))
    >>> [(g.root, g.size) for g in graph.groups if g.prunable]
    [('conv1', 16), ...]
"""

from __future__ import annotations

import operator
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ModelError
from slimkit.graph.labels import STATIC, Labels, LabelSet, static
from slimkit.graph.ops import OP_RULES, OpContext, unknown_rule

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: Modules whose forward checks sizes against attributes the slicer does not rewrite: all
#: their tensors keep their sizes (the channels around them stay prunable where not coupled).
FIXED_MODULES: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: "nn.MultiheadAttention checks embed_dim/num_heads itself; write "
                           "attention with q/k/v/out nn.Linear layers to prune its heads",
    nn.RNNBase: "recurrent layers keep their sizes",
}


@dataclass
class Member:
    """One coupled slice: ``indices[i]`` of dimension ``dim`` of ``param`` belong to channel i."""

    param: str
    dim: int
    indices: list[list[int]]


@dataclass
class Group:
    """Channels that are removed together, and every tensor slice each one owns.

    Attributes:
        id: position in the graph's group list.
        root: the module whose output channels define the group (a Conv/Linear when one is
            a member).
        size: number of channels (or heads, or conv groups) that can be removed one by one.
        members: coupled slices; ``members[k].indices[i]`` is channel ``i`` in member ``k``.
        heads: modules whose head-count attribute equals this group's kept channel count.
        prunable: False when some op ties the group to a fixed size.
        why: the reasons it is not prunable.
    """

    id: int
    root: str
    size: int
    members: list[Member]
    heads: list[str] = field(default_factory=list)
    prunable: bool = True
    why: list[str] = field(default_factory=list)

    def param_names(self) -> set[str]:
        return {m.param for m in self.members}

    def modules(self) -> set[str]:
        return {m.param.rsplit(".", 1)[0] if "." in m.param else "" for m in self.members}


@dataclass
class DependencyGraph:
    """All groups of a model plus the ops the analysis could not handle."""

    groups: list[Group]
    unsupported: list[dict[str, str]]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self.groups], "unsupported": self.unsupported}


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
    """``torch.export`` the model in eval mode (its mode is restored afterwards).

    Raises:
        ModelError: the model cannot be captured; names the module and the exporter's complaint.
    """
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:
        where = module_in_traceback(model, exc)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"cannot capture the graph of {type(model).__name__} for structured "
                         f"pruning: in module '{where}': {type(exc).__name__}: {first}. Make "
                         "that module traceable (no data-dependent Python control flow) or "
                         "exclude it.") from exc
    finally:
        model.train(was_training)


def module_in_traceback(model: nn.Module, exc: BaseException) -> str:
    """The innermost submodule of ``model`` whose code was running when ``exc`` was raised.

    Returns:
        ``"name (Class.method)"``, or ``"<root>"``.
    """
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = "<root>"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            where = f"{names[id(obj)]} ({type(obj).__name__}.{frame.f_code.co_name})"
    return where


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", str(target))


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).removeprefix("L['self'].")


def _shape(node: torch.fx.Node) -> list[int]:
    val = node.meta.get("val")
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else []


def _walk(ep: Any) -> tuple[LabelSet, dict[str, Labels], set[int], list, list[dict]]:
    """Propagate labels through the exported graph.

    Returns:
        The label store, the labels of each parameter/buffer, the labels seen on activations,
        the (module, labels) of head splits, and the ops without a rule that met a channel.
    """
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    ls = LabelSet()
    env: dict[torch.fx.Node, Any] = {}
    params: dict[str, Labels] = {}
    seen: set[int] = set()
    heads: list = []
    unsupported: list[dict[str, str]] = []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if node.name in names:
                labels = [ls.fresh(s) for s in shape]
                params[names[node.name]] = labels
                env[node] = labels
            else:
                env[node] = static(shape) if shape or isinstance(node.meta.get("val"),
                                                                 torch.Tensor) else None
        elif node.op == "call_function":
            env[node] = _apply_rule(ls, node, env, heads, unsupported)
            for arr in _arrays(env[node]):
                seen.update(arr[arr >= 0].tolist())
        elif node.op == "output":
            for arr in _arrays(_sub(node.args, env)):
                ls.lock(arr, "", "output", "model output")
    return ls, params, seen, heads, unsupported


def _apply_rule(ls: LabelSet, node: torch.fx.Node, env: dict, heads: list,
                unsupported: list[dict[str, str]]) -> Any:
    op = _op_name(node.target)
    if op not in OP_RULES and op.endswith("_") and op[:-1] in OP_RULES:
        op = op[:-1]  # in-place variants (dropout_, relu_) move labels like the originals
    ctx = OpContext(ls, node, _module_of(node), op, heads)
    args = list(_sub(node.args, env))
    known = op in OP_RULES
    before = len(ls.locks)
    try:
        if known:
            return OP_RULES.get(op)(ctx, args)
    except Exception as exc:  # a rule that cannot follow this use of the op: be conservative
        unsupported.append({"module": ctx.module, "op": op,
                            "why": f"{type(exc).__name__}: {exc}"[:200]})
    out = unknown_rule(ctx, args)
    if not known and len(ls.locks) > before:
        unsupported.append({"module": ctx.module, "op": op, "why": "no channel rule for this op"})
    return out


def _sub(x: Any, env: dict) -> Any:
    if isinstance(x, torch.fx.Node):
        return env.get(x)
    if isinstance(x, (list, tuple)):
        out = [_sub(a, env) for a in x]
        return out if isinstance(x, list) else tuple(out)
    return x


def _arrays(x: Any) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _arrays(v)]
    return []


def build_dependency_graph(model: nn.Module,
                           example_inputs: Sequence[torch.Tensor]) -> DependencyGraph:
    """Capture ``model`` and group its coupled channels.

    Args:
        model: any ``torch.export``-able module (not modified).
        example_inputs: one batch of inputs, as the model's forward takes them.

    Returns:
        A :class:`DependencyGraph`; ``graph.to_dict()`` is JSON-serializable.

    Raises:
        ModelError: the model cannot be captured (naming the module and the complaint).
    """
    ep = capture(model, example_inputs)
    ls, params, seen, heads, unsupported = _walk(ep)
    _lock_fixed_modules(model, ls, params)
    seen_roots = {ls.find(v) for v in seen}
    locked: dict[int, list[str]] = defaultdict(list)
    for lock in ls.locks:
        why = f"{lock.module or '<root>'}: {lock.op}: {lock.why}"
        for r in {ls.find(int(v)) for v in lock.labels.tolist()}:
            if len(locked[r]) < 3 and why not in locked[r]:
                locked[r].append(why)
    comps: dict[int, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for name, labels in params.items():
        for d, arr in enumerate(labels):
            for i, r in enumerate(ls.roots(arr).tolist()):
                if r >= 0 and r in seen_roots:
                    comps[r][(name, d)].append(i)
    groups, roots = _make_groups(model, comps, locked)
    _attach_heads(ls, groups, roots, heads)
    return DependencyGraph(groups, _dedupe(unsupported))


def _lock_fixed_modules(model: nn.Module, ls: LabelSet, params: dict[str, Labels]) -> None:
    for name, mod in model.named_modules():
        why = next((w for cls, w in FIXED_MODULES.items() if isinstance(mod, cls)), None)
        if why is None:
            continue
        prefix = f"{name}." if name else ""
        for pname, labels in params.items():
            if pname.startswith(prefix):
                for arr in labels:
                    ls.lock(arr, name, type(mod).__name__, why)


def _make_groups(model: nn.Module, comps: dict, locked: dict[int, list[str]],
                 ) -> tuple[list[Group], dict[int, list[int]]]:
    """Channels touching the same slices (same params, dims and widths) form one group.

    Returns:
        The groups, and for each group (by object id) its channels' label roots.
    """
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for r, members in comps.items():
        sig = tuple(sorted((p, d, len(ix)) for (p, d), ix in members.items()))
        by_sig[sig].append(r)
    order = {n: i for i, (n, _) in enumerate([*model.named_parameters(remove_duplicate=False),
                                             *model.named_buffers(remove_duplicate=False)])}
    modules = dict(model.named_modules())
    groups, label_roots = [], {}
    for sig, roots in by_sig.items():
        keys = sorted({(p, d) for p, d, _ in sig}, key=lambda k: (order.get(k[0], 1 << 30), k))
        roots.sort(key=lambda r: [comps[r][k][0] for k in keys])
        members = [Member(p, d, [comps[r][(p, d)] for r in roots]) for p, d in keys]
        why = sorted({w for r in roots for w in locked.get(r, [])})[:3]
        groups.append(Group(0, _root(members, modules), len(roots), members,
                            prunable=not why and len(roots) > 1,
                            why=why or ([] if len(roots) > 1 else ["a single channel"])))
        label_roots[id(groups[-1])] = roots
    groups.sort(key=lambda g: min(order.get(m.param, 1 << 30) for m in g.members))
    for i, g in enumerate(groups):
        g.id = i
    return groups, label_roots


def _root(members: list[Member], modules: dict[str, nn.Module]) -> str:
    for m in members:
        mod_name = m.param.rsplit(".", 1)[0] if "." in m.param else ""
        if m.dim == 0 and isinstance(modules.get(mod_name), PRODUCERS):
            return mod_name
    first = members[0].param
    return first.rsplit(".", 1)[0] if "." in first else first


def _attach_heads(ls: LabelSet, groups: list[Group], roots: dict[int, list[int]],
                  heads: list) -> None:
    """Name, on each group, the modules whose head count is that group's channel count."""
    index = {r: g for g in groups for r in roots[id(g)]}
    for module, labels in heads:
        found = {id(index[r]): index[r] for r in ls.roots(labels).tolist() if r in index}
        for g in found.values():
            if module not in g.heads:
                g.heads.append(module)


def _dedupe(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for r in rows:
        key = (r["module"], r["op"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def analyze(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """What structured pruning could do to ``model``, before any work starts.

    Returns:
        ``{"prunable": [{"root", "size", "members"}], "unprunable": [{"root", "size", "why"}],
        "unsupported": [{"module", "op", "why"}]}``: ops without a channel rule (by module name
        and aten op) and groups that are tied to a fixed size, with the reason.

    Raises:
        ModelError: the model cannot be captured at all (naming the module and op).

    Example:
        >>> report = analyze(model, (torch.randn(1, 3, 32, 32),))
        >>> report["unsupported"]
        []
    """
    graph = build_dependency_graph(model, example_inputs)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {
        "prunable": [{"root": g.root, "size": g.size, "members": len(g.members),
                      "heads": g.heads} for g in graph.groups if g.prunable],
        "unprunable": [{"root": g.root, "size": g.size, "why": g.why}
                       for g in graph.groups if not g.prunable and g.param_names() & names],
        "unsupported": graph.unsupported,
    }


__all__ = ["STATIC", "DependencyGraph", "Group", "Member", "analyze", "build_dependency_graph",
           "capture", "module_in_traceback"]
