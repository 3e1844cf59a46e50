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
A fused q/k/v projection split by a size its module keeps (GPT-2's ``c_attn``, a Hugging Face
``Conv1D`` whose weight is ``[in, out]``; see :mod:`slimkit.graph.layers`) loses the same heads
from q, k and v.

With ``attention="head_dims"`` a split ``E -> (heads, head_dim)`` is pruned by inner position
instead: channel ``j`` is position ``j`` of every head (q and k rows, contracted together by
``q @ k^T``; v rows and the out-projection columns they feed), and all splits inside one module
(q, k, v reshaped with one head-size attribute) are coupled so that every head keeps one size.

The model takes its inputs as users' models do (a tensor, positional tensors, or keyword ones
such as ``input_ids`` and ``attention_mask``; see :mod:`slimkit.io.batch`) and may return
several outputs (a tuple, a dict, a ``ModelOutput``): the inputs' and every output's sizes are
fixed, so channels reaching any output are kept as a classifier head's outputs are.

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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.graph.attention import scale_follows_head_size, split_follows_heads
from slimkit.graph.labels import STATIC, Labels, LabelSet, static
from slimkit.graph.layers import out_dim
from slimkit.graph.ops import OP_RULES, OpContext, SplitLog, unknown_rule
from slimkit.io import batch as B

#: ``attention`` modes: the prunable unit of a dim split into (heads, head_dim).
ATTENTION_UNITS = {"heads": "heads", "head_dims": "inner"}
#: Ops between a query projection and its use that keep its rows (walked back to find it).
_QUERY_PATH = {"view", "reshape", "_unsafe_view", "unflatten", "transpose", "permute", "clone",
               "contiguous", "mul", "div", "_to_copy", "alias", "expand", "dropout"}

#: Modules whose forward checks sizes against attributes the slicer does not rewrite: all
#: their tensors keep their sizes (the channels around them stay prunable where not coupled).
FIXED_MODULES: dict[type[nn.Module], str] = {
    # structured_prune unfuses every one it can first (slimkit.prune.unfuse); these are the
    # ones analyze() sees, and those left fused (excluded, add_bias_kv, add_zero_attn).
    nn.MultiheadAttention: "nn.MultiheadAttention checks embed_dim/num_heads itself (pruning "
                           "unfuses it into q/k/v/out nn.Linear unless it is excluded or uses "
                           "add_bias_kv/add_zero_attn)",
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
        head_dims: modules whose head-size attribute equals this group's kept channel count
            (``attention="head_dims"``).
        queries: query-projection tensors (weight, bias) whose rows are scaled by
            ``sqrt(kept / size)`` when this group shrinks, because the module's softmax scale
            follows its head size (:func:`scale_follows_head_size`): the pruned model then
            still computes ``q . k / sqrt(original head size)``.
        prunable: False when some op ties the group to a fixed size.
        why: the reasons it is not prunable.
    """

    id: int
    root: str
    size: int
    members: list[Member]
    heads: list[str] = field(default_factory=list)
    head_dims: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    prunable: bool = True
    why: list[str] = field(default_factory=list)

    def param_names(self) -> set[str]:
        return {m.param for m in self.members}

    def modules(self) -> set[str]:
        return {m.param.rsplit(".", 1)[0] if "." in m.param else "" for m in self.members}

    def describe(self) -> str:
        """How records name the group: ``group 3 (layer.0.fc1, 64 channels)``."""
        return f"group {self.id} ({self.root}, {self.size} channels)"


@dataclass
class DependencyGraph:
    """All groups of a model plus the ops the analysis could not handle."""

    groups: list[Group]
    unsupported: list[dict[str, str]]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self.groups], "unsupported": self.unsupported}


def export_arguments(example_inputs: B.Inputs) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of the forward call :func:`slimkit.io.batch.call` makes with a batch:
    a tensor or tuple gives positional arguments, a dict keyword ones."""
    return B.call(lambda *args, **kwargs: (tuple(args), dict(kwargs)), example_inputs)


def capture(model: nn.Module, example_inputs: B.Inputs) -> Any:
    """``torch.export`` the model in eval mode (its mode is restored afterwards).

    Args:
        model: the model.
        example_inputs: one batch as the model takes it (see :mod:`slimkit.io.batch`): a
            tensor, a tuple of positional inputs (``(x,)`` too) or a dict of keyword inputs.

    Raises:
        ModelError: the model cannot be captured; names the module and the exporter's complaint.
    """
    args, kwargs = export_arguments(example_inputs)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, args, kwargs=kwargs or None, strict=False)
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


def _walk(ep: Any, log: SplitLog) -> tuple[LabelSet, dict[str, Labels], set[int], list[dict]]:
    """Propagate labels through the exported graph (head splits are noted in ``log``).

    Returns:
        The label store, the labels of each parameter/buffer, the labels seen on activations,
        and the ops without a rule that met a channel.
    """
    names = _tensor_names(ep)
    ls = LabelSet()
    env: dict[torch.fx.Node, Any] = {}
    params: dict[str, Labels] = {}
    seen: set[int] = set()
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
            env[node] = _apply_rule(ls, node, env, log, unsupported)
            for arr in _arrays(env[node]):
                seen.update(arr[arr >= 0].tolist())
        elif node.op == "output":  # every output (tuple, dict, ModelOutput: flat here) keeps
            for arr in _arrays(_sub(node.args, env)):  # its size, as a single one does
                ls.lock(arr, "", "output", "model output")
    return ls, params, seen, unsupported


def _tensor_names(ep: Any) -> dict[str, str]:
    """Placeholder node name -> parameter/buffer name."""
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def _apply_rule(ls: LabelSet, node: torch.fx.Node, env: dict, log: SplitLog,
                unsupported: list[dict[str, str]]) -> Any:
    op = _op_name(node.target)
    if op not in OP_RULES and op.endswith("_") and op[:-1] in OP_RULES:
        op = op[:-1]  # in-place variants (dropout_, relu_) move labels like the originals
    ctx = OpContext(ls, node, _module_of(node), op, log)
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


def build_dependency_graph(model: nn.Module, example_inputs: B.Inputs,
                           attention: str = "heads") -> DependencyGraph:
    """Capture ``model`` and group its coupled channels.

    Args:
        model: any ``torch.export``-able module (not modified).
        example_inputs: one batch of inputs, as the model's forward takes them: a tensor, a
            tuple of positional inputs or a dict of keyword inputs (:mod:`slimkit.io.batch`).
        attention: ``"heads"``: attention is pruned by whole heads; ``"head_dims"``: by
            position inside every head (all heads keep one, smaller, head size).

    Returns:
        A :class:`DependencyGraph`; ``graph.to_dict()`` is JSON-serializable.

    Raises:
        ConfigError: an unknown ``attention`` mode.
        ModelError: the model cannot be captured (naming the module and the complaint).
    """
    if attention not in ATTENTION_UNITS:
        raise ConfigError(f"unknown attention pruning mode {attention!r}; known: "
                          f"{sorted(ATTENTION_UNITS)}")
    ep = capture(model, example_inputs)
    log = SplitLog(ATTENTION_UNITS[attention])
    ls, params, seen, unsupported = _walk(ep, log)
    if attention == "head_dims":
        _couple_module_splits(ls, log.splits)
    _resolve_fused_splits(model, ls, log)
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
    index = {r: g for g in groups for r in roots[id(g)]}
    _attach_splits(ls, index, log.splits, "heads" if attention == "heads" else "head_dims")
    _attach_queries(model, ls, index, log.queries, _tensor_names(ep))
    return DependencyGraph(groups, _dedupe(unsupported))


def _couple_module_splits(ls: LabelSet, splits: list[tuple[str, np.ndarray]]) -> None:
    """One module reshapes q, k and v with one head size: their inner positions go together."""
    by_module: dict[str, list[np.ndarray]] = defaultdict(list)
    for module, labels in splits:
        by_module[module].append(labels)
    for module, arrays in by_module.items():
        if len({len(a) for a in arrays}) > 1:
            for a in arrays:
                ls.lock(a, module, "view", "head splits of different sizes in one module "
                                           f"({sorted({len(a) for a in arrays})})")
            continue
        for a in arrays[1:]:
            ls.unite(arrays[0], a, module, "view")


def _resolve_fused_splits(model: nn.Module, ls: LabelSet, log: SplitLog) -> None:
    """Prune a fused q/k/v projection (GPT-2's ``c_attn``) by heads, or lock it.

    Its output is split into equal pieces of a size fixed at trace time. They stay equal when
    the same positions go from every piece and the split size follows the pruned heads: the
    module holds it in an attribute equal to head count x head size
    (:func:`~slimkit.graph.attention.split_follows_heads`; the slicer sets it with the heads),
    and every position of every piece is inside a head split of that module. Otherwise the
    pieces keep their sizes.
    """
    modules = dict(model.named_modules())
    ok = []
    for module, pieces in log.fused:
        if split_follows_heads(modules.get(module), len(pieces[0])):
            for p in pieces[1:]:
                ls.unite(pieces[0], p, module, "split")
            ok.append((module, pieces))
        else:
            _lock_split(ls, module, pieces, "")
    for module, pieces in ok:
        split = {r for m, labels in log.splits if m == module for r in ls.roots(labels).tolist()}
        if any(r >= 0 and r not in split for p in pieces for r in ls.roots(p).tolist()):
            _lock_split(ls, module, pieces, ", some of whose positions are not split into "
                                            "heads there")


def _lock_split(ls: LabelSet, module: str, pieces: list[np.ndarray], extra: str) -> None:
    sizes = [len(p) for p in pieces]
    ls.lock(np.concatenate(pieces), module, "split",
            f"split into fixed sizes {sizes} (chunk(n) can be pruned, as can a fused q/k/v "
            f"projection split by a `split_size` equal to heads x head size){extra}")


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
        if m.dim == out_dim(modules.get(mod_name)):  # None for any non-layer: never equal
            return mod_name
    first = members[0].param
    return first.rsplit(".", 1)[0] if "." in first else first


def _groups_of(ls: LabelSet, index: dict[int, Group], labels: np.ndarray) -> list[Group]:
    found = {id(index[r]): index[r] for r in ls.roots(labels).tolist() if r in index}
    return list(found.values())


def _attach_splits(ls: LabelSet, index: dict[int, Group], splits: list, attr: str) -> None:
    """Name, on each group, the modules whose head count (or head size) is its channel count."""
    for module, labels in splits:
        for g in _groups_of(ls, index, labels):
            if module not in getattr(g, attr):
                getattr(g, attr).append(module)


def _attach_queries(model: nn.Module, ls: LabelSet, index: dict[int, Group],
                    queries: list, names: dict[str, str]) -> None:
    """Name the query projections that carry the original softmax scale (Group.queries).

    Where the scale follows the head size, the query projection found by walking back from
    the contraction is rescaled by the plan. A group whose query projection cannot be found is
    locked: its scale could not be kept.
    """
    modules = dict(model.named_modules())
    for module, node, labels in queries:
        groups = [g for g in _groups_of(ls, index, labels)  # head dims, not token dims
                  if g.head_dims and scale_follows_head_size(modules.get(module), g.size)]
        if not groups:
            continue
        params, missing = _query_projection(node, names)
        for g in groups:
            if params:
                g.queries += [p for p in params if p not in g.queries]
            else:
                g.prunable = False
                g.why.append(f"{module or '<root>'}: the attention scale follows the head size "
                             f"and {missing}")


def _query_projection(node: torch.fx.Node, names: dict[str, str]) -> tuple[list[str], str]:
    """The weight (and bias) of the Linear that produced ``node``, through reshapes; else
    ``[]`` and why not."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        op = _op_name(node.target)
        if op == "linear":
            return [names[a.name] for a in node.args[1:3]
                    if isinstance(a, torch.fx.Node) and a.name in names], ""
        if op == "getitem" and isinstance(node.args[0], torch.fx.Node) and \
                _op_name(node.args[0].target) in ("split", "split_with_sizes", "chunk"):
            # q is one piece of a fused q/k/v projection (GPT-2's c_attn): a plan scales
            # whole tensors, so the query rows alone cannot be rescaled
            return [], ("its query projection is fused with the keys and values (a plan "
                        "rescales whole tensors); prune whole heads instead (attention: heads)")
        if op.rstrip("_") not in _QUERY_PATH or not node.args:
            break
        node = node.args[0]
    return [], ("its query projection was not found; give the module a float `scaling` "
                "attribute that is not 1/sqrt(head size)")


def _dedupe(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for r in rows:
        key = (r["module"], r["op"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def analyze(model: nn.Module, example_inputs: B.Inputs,
            attention: str = "heads") -> dict[str, Any]:
    """What structured pruning could do to ``model``, before any work starts.

    Args:
        model: the model (not modified).
        example_inputs: one batch of inputs (a tensor, a tuple or a dict of tensors).
        attention: ``"heads"`` or ``"head_dims"`` (see :func:`build_dependency_graph`).

    Returns:
        ``{"prunable": [{"root", "size", "members", "heads", "head_dims"}],
        "unprunable": [{"root", "size", "why"}],
        "unsupported": [{"module", "op", "why"}]}``: ops without a channel rule (by module name
        and aten op) and groups that are tied to a fixed size, with the reason.

    Raises:
        ModelError: the model cannot be captured at all (naming the module and op).

    Example:
        >>> report = analyze(model, (torch.randn(1, 3, 32, 32),))
        >>> report["unsupported"]
        []
    """
    graph = build_dependency_graph(model, example_inputs, attention)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {
        "prunable": [{"root": g.root, "size": g.size, "members": len(g.members),
                      "heads": g.heads, "head_dims": g.head_dims}
                     for g in graph.groups if g.prunable],
        "unprunable": [{"root": g.root, "size": g.size, "why": g.why}
                       for g in graph.groups if not g.prunable and g.param_names() & names],
        "unsupported": graph.unsupported,
    }


__all__ = ["STATIC", "DependencyGraph", "Group", "Member", "analyze", "build_dependency_graph",
           "capture", "export_arguments", "module_in_traceback"]
