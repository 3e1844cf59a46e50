"""Residual branches that can be removed whole: the units of depth pruning. Read-only.

A residual block computes ``y = g(s + f(s))``: a shortcut ``s`` (the block input, or an
``nn.Identity`` of it) plus a branch ``f``. Removing the branch leaves ``y = g(s)``, a valid,
shallower network that fine-tuning adapts to (the residual-network lesion results of Veit et
al., NeurIPS 2016; layer pruning for latency, Elkerdawy et al., ACCV 2020). Unlike channel
pruning, this removes every op of the branch, which is what makes small models faster where
per-op costs dominate (PyTorch eager at batch 1 on CPU).

Each module's own ``forward`` is traced with ``torch.fx``, its child modules kept as calls, so
an add is found in the module that writes it, whatever the architecture. An add counts when:
one operand's exclusive ancestors (the branch) are used nowhere else and hold parameters; the
other operand is the shortcut, reached through nothing but ``nn.Identity``/``nn.Dropout``; both
operands have the output's shape (measured with the example inputs), so no broadcasting add
(``x + position_embedding``) qualifies. Modules that ``torch.fx`` cannot trace (data-dependent
control flow) are simply not searched; the caller reports them.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit.io import batch as B
from slimkit.io.model import modes_kept

ADDS = {operator.add, operator.iadd, torch.add}
PASS_THROUGH = (nn.Identity, nn.Dropout)


@dataclass
class Branch:
    """A removable residual branch.

    Attributes:
        module: qualified name of the module whose forward holds the add (``""``: the model).
        add: the add's node name in that module's FX trace.
        shortcut: the node name of the operand that stays.
        nodes: node names of the branch (removed with it).
        modules: qualified names (in the model) of the submodules only the branch calls.
        params: parameters the branch holds.
    """

    module: str
    add: str
    shortcut: str
    nodes: list[str]
    modules: list[str]
    params: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ChildCalls(fx.Tracer):
    """Traces one module's own forward; every child module stays a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_module(module: nn.Module) -> fx.GraphModule:
    """``module``'s forward as an FX graph of its child calls and functions.

    Raises:
        Exception: whatever ``torch.fx`` raises for an untraceable forward.
    """
    graph = _ChildCalls().trace(module)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    is_add = ((node.op == "call_function" and node.target in ADDS)
              or (node.op == "call_method" and node.target == "add"))
    args = node.args
    if is_add and not node.kwargs and len(args) == 2 and all(isinstance(a, fx.Node)
                                                              for a in args):
        return args[0], args[1]
    return None


def _called(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _branch(gm: fx.GraphModule, add: fx.Node, branch: fx.Node,
            shortcut: fx.Node) -> list[fx.Node] | None:
    """The branch's nodes when ``branch`` can go and ``shortcut`` stay, else None."""
    keep = _ancestors(shortcut)
    upstream = _ancestors(branch)
    nodes = [n for n in upstream - keep if n.op != "placeholder"]
    inside = set(nodes) | {add}
    if not nodes or any(u not in inside for n in nodes for u in n.users):
        return None  # the branch feeds something else too: not removable on its own
    if not any(n.op == "placeholder" for n in upstream):
        return None  # a constant (x + position table): no f(x) to remove
    pure = all(isinstance(_called(gm, n), PASS_THROUGH) for n in keep - _ancestors(branch)
               if n.op != "placeholder")
    holds = any(n.op == "get_attr" or (n.op == "call_module"
                                       and any(True for _ in _called(gm, n).parameters()))
                for n in nodes)
    if not (pure and holds):
        return None
    outside = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in inside}
    if any(n.op == "call_module" and n.target in outside for n in nodes):
        return None  # a branch module is called again elsewhere (shared weights)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _module_inputs(model: nn.Module, example: B.Inputs,
                   ) -> dict[str, list[tuple[tuple, dict[str, Any]]]]:
    """Each module's inputs on the example, ``(args, kwargs)`` per call."""
    calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
    hooks = []
    for name, m in model.named_modules():
        def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any], name: str = name) -> None:
            calls.setdefault(name, []).append((args, dict(kwargs)))
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        B.call(model, example)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The traced forward's placeholders, in order, from a call's ``args`` and ``kwargs``
    (keyword inputs such as ``input_ids=...`` by name; defaults where neither gives one).

    Raises:
        TypeError: a placeholder no argument gives (``*args``, ``**kwargs``).
    """
    values: list[Any] = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        name = str(node.target)
        if len(values) < len(args):
            values.append(args[len(values)])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TypeError(f"no value for the forward argument '{name}'")
    return values


def find_branches(model: nn.Module, example: B.Inputs,
                  ) -> tuple[list[Branch], list[dict[str, str]]]:
    """Every removable residual branch of ``model``, and the modules that were not searched.

    Args:
        model: any module (not modified).
        example: inputs of one forward pass, as the model takes them (a tensor, a tuple or a
            dict; shapes decide which adds are residual).

    Returns:
        ``(branches, skipped)``; ``skipped`` names the modules that could not be searched
        (a forward ``torch.fx`` cannot trace, or adds whose shapes could not be measured),
        with the reason.

    Example:
        >>> [b.module for b in find_branches(resnet20((1, 28, 28), 10), (x,))[0]][:2]
        ['layer1.0', 'layer1.1']
    """
    with modes_kept(model), torch.no_grad():
        model.eval()  # shape propagation runs the modules: no BN statistics may move
        return _find(model, example)


def _find(model: nn.Module, example: B.Inputs,
          ) -> tuple[list[Branch], list[dict[str, str]]]:
    inputs = _module_inputs(model, example)
    params_of = dict(model.named_modules())
    shared = _shared_params(model)
    found, skipped = [], []
    for name, module in model.named_modules():
        if len(inputs.get(name, ())) != 1:
            continue  # never called, or called several times: not one block
        try:
            gm = trace_module(module)
        except Exception as exc:  # noqa: BLE001 - fx raises many types; report, go on
            if next(module.children(), None) is not None:  # leaves hold no blocks
                skipped.append({"what": f"module {name or '(model)'}",
                                "why": f"not traceable by torch.fx ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:120]}); its residual "
                                       "blocks, if any, were not searched"})
            continue
        adds = [n for n in gm.graph.nodes if _add_operands(n)]
        if not adds:
            continue
        try:
            ShapeProp(gm).propagate(*_positional(gm, *inputs[name][0]))
        except Exception as exc:  # noqa: BLE001 - keyword-only inputs etc.: not searched
            skipped.append({"what": f"module {name or '(model)'}",
                            "why": f"its adds' shapes could not be measured ({type(exc).__name__}"
                                   "); its residual blocks, if any, were not searched"})
            continue
        for add in adds:
            a, b = _add_operands(add)
            for branch, short in ((b, a), (a, b)):
                nodes = _branch(gm, add, branch, short)
                if nodes and _same_shapes(add, branch, short):
                    mods = sorted({_join(name, str(n.target)) for n in nodes
                                   if n.op == "call_module"})
                    if any(p in shared for m in mods for p in _param_ids(params_of[m])):
                        continue
                    params = sum(_n_params(params_of[m]) for m in mods) + sum(
                        gm.get_parameter(str(n.target)).numel() for n in nodes
                        if n.op == "get_attr" and _is_param(gm, str(n.target)))
                    found.append(Branch(name, add.name, short.name, [n.name for n in nodes],
                                        mods, params))
                    break
    return found, skipped


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def _same_shapes(*nodes: fx.Node) -> bool:
    shapes = {tuple(n.meta["tensor_meta"].shape) if hasattr(n.meta.get("tensor_meta"), "shape")
              else None for n in nodes}
    return len(shapes) == 1 and None not in shapes


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _param_ids(m: nn.Module) -> set[int]:
    return {id(p) for p in m.parameters()}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _shared_params(model: nn.Module) -> set[int]:
    """Parameters reachable under more than one module path (tied weights)."""
    seen: dict[int, str] = {}
    shared = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and seen[id(p)] != name:
            shared.add(id(p))
        seen[id(p)] = name
    return shared
