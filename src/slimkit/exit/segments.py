"""Cut a model into segments at named blocks, so that inference can stop between them.

The model's forward is traced with ``torch.fx``; only the modules on the way to a cut block
are traced through (every other module, and the cut blocks themselves, stay single calls), so
custom code elsewhere in the model never has to be traceable. Segment ``k`` runs every node
after cut ``k - 1`` up to and including cut block ``k``; it takes the *state*, the values
computed before it that are still needed later, and returns the next state and the cut
block's output (what the exit head reads). Every state value must be a per-sample tensor
(batch first), so that samples that exited can be dropped from it row by row, or None
(a transformers model's attention mask when there is none to apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimkit.core.errors import ConfigError, ModelError, did_you_mean
from slimkit.io import batch as B


class _CutTracer(fx.Tracer):
    """Trace through only the ancestors of the cut blocks: everything else is a leaf."""

    def __init__(self, cuts: list[str]) -> None:
        super().__init__()
        self.cuts = set(cuts)
        self.open = {p for c in cuts for p in _ancestors(c)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.open


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["", "a", "a.b"]``: the modules whose forward calls lead to ``name``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


@dataclass
class Segment:
    """One piece of the cut model: ``module(*state) -> (next_state, feature)``."""

    module: fx.GraphModule
    n_in: int
    n_out: int


def check_names(model: nn.Module, names: list[str]) -> None:
    """Refuse a name that is no submodule of ``model`` (or the model itself).

    Raises:
        ConfigError: naming the block and the closest existing name.
    """
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"early_exit: the model has no block '{name}'.{did_you_mean(name, known)} "
                f"Name blocks as in model.named_modules(), e.g. {', '.join(known[:4])}")


def trace(model: nn.Module, cuts: list[str], hf: dict[str, Any] | None = None,
          ) -> fx.GraphModule:
    """The model's forward as an fx graph with each cut block as one ``call_module`` node.

    Args:
        hf: for a transformers model, its inputs (``{"inputs": [{"name", "shape",
            "dtype"}]}``, see :func:`hf_spec`): it is traced through
            :mod:`slimkit.exit.hf`, its cut blocks under the prefix ``model.``.

    Raises:
        ModelError: the forward cannot be traced (naming the first line of the reason).
    """
    try:
        if hf is not None:
            return _trace_hf(model, cuts, hf)
        tracer = _CutTracer(cuts)
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises anything the user's code raises on proxies
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"early_exit: cannot trace {type(model).__name__}'s forward to cut it "
                         f"at {', '.join(cuts)} ({type(exc).__name__}: {first}); give blocks "
                         "whose callers are plain tensor code") from None
    return fx.GraphModule(tracer.root, graph)


def hf_spec(model: nn.Module, x: Any) -> dict[str, Any] | None:
    """What tracing a transformers model needs to know of its inputs (names, per-sample
    shapes, dtypes: a JSON-able part of the plan), or None for any other model."""
    from slimkit.exit.hf import is_hf

    if not is_hf(model) or not isinstance(x, dict):
        return None
    return {"inputs": [{"name": k, "shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                       for k, v in x.items()]}


def _trace_hf(model: nn.Module, cuts: list[str], hf: dict[str, Any]) -> fx.GraphModule:
    from slimkit.exit.hf import PREFIX, ValueTracing, hf_call, hf_tracing

    class Tracer(ValueTracing, _CutTracer):
        pass

    rows = hf["inputs"]
    tracer = Tracer([PREFIX + c for c in cuts])
    # Example values (two samples: a batch of one would let a size-1 batch look constant).
    tracer.examples = {r["name"]: torch.ones((2, *r["shape"]),
                                             dtype=getattr(torch, r["dtype"].removeprefix(
                                                 "torch.")))
                       for r in rows}
    root = hf_call(model, [r["name"] for r in rows])
    with hf_tracing(tracer, model):
        graph = tracer.trace(root)
    for node in graph.nodes:  # the example values were for tracing only
        node.meta.pop("value", None)
    gm = fx.GraphModule(tracer.root, graph)
    gm.meta["cut_prefix"] = PREFIX
    return gm


def _cut_nodes(gm: fx.GraphModule, cuts: list[str], prefix: str = "") -> list[fx.Node]:
    """The one ``call_module`` node of each cut (named under ``prefix`` in ``gm``), in
    execution order."""
    calls: dict[str, list[fx.Node]] = {prefix + c: [] for c in cuts}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(node)
    for name, found in calls.items():
        if len(found) != 1:
            how = "never" if not found else f"{len(found)} times"
            raise ConfigError(f"early_exit: block '{name.removeprefix(prefix)}' runs {how} in "
                              "the model's forward; an exit goes after a block that runs "
                              "exactly once")
    return sorted((calls[prefix + c][0] for c in cuts), key=lambda n: _order(gm)[n])


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def split(gm: fx.GraphModule, cuts: list[str]) -> tuple[list[Segment], list[str]]:
    """Cut ``gm`` after each cut block: ``len(cuts) + 1`` segments, and the cuts in
    execution order. The last segment returns the model's output (no feature)."""
    prefix = gm.meta.get("cut_prefix", "")
    nodes = _cut_nodes(gm, cuts, prefix)
    order = _order(gm)
    bounds = [order[n] for n in nodes]

    def part(n: fx.Node) -> int:
        return sum(order[n] > b for b in bounds)

    users_part: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        for u in n.users:
            users_part[n] = max(users_part.get(n, -1), part(u))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    segments: list[Segment] = []
    state: list[fx.Node] = placeholders
    for k in range(len(nodes) + 1):
        body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")
                and part(n) == k]
        later = [n for n in [*state, *body] if users_part.get(n, -1) > k]
        last = k == len(nodes)
        segments.append(_segment(gm, state, body, None if last else (later, nodes[k]),
                                 first=k == 0))
        state = later
    return segments, [str(n.target).removeprefix(prefix) for n in nodes]


def _segment(gm: fx.GraphModule, state: list[fx.Node], body: list[fx.Node],
             outputs: tuple[list[fx.Node], fx.Node] | None, first: bool) -> Segment:
    """A GraphModule running ``body`` on ``state``; returns ``(next_state, feature)`` or,
    for the last segment, the model's own output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in state:
        if first:  # the model's own placeholders keep their names, defaults and order
            env[n] = graph.node_copy(n, lambda a: env[a])
        else:
            env[n] = graph.placeholder(n.name)
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs is None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        graph.output(fx.map_arg(out.args[0], lambda a: env[a]))
        n_out = 0
    else:
        later, feature = outputs
        graph.output((tuple(env[n] for n in later), env[feature]))
        n_out = len(later)
    graph.lint()
    return Segment(fx.GraphModule(gm, graph), len(state), n_out)


def check_state(segments: list[Segment], names: list[str], x: B.Inputs) -> list[torch.Tensor]:
    """Run the segments on ``x`` (eval mode, no grad) and check that every state value is a
    per-sample tensor and every cut block's output a float ``[batch, channels, ...]`` tensor.

    Returns each cut block's output on ``x`` (for the heads' sizes).

    Raises:
        ModelError: naming the block and what its exit cannot use.
    """
    n = B.size(x)
    feats: list[torch.Tensor] = []
    state: Any = None
    with torch.no_grad():
        for k, seg in enumerate(segments[:-1]):
            state, feat = B.call(seg.module, x) if k == 0 else seg.module(*state)
            name = names[k]
            if not isinstance(feat, torch.Tensor) or not feat.is_floating_point() \
                    or feat.dim() < 2 or feat.shape[0] != n:
                what = (f"a {type(feat).__name__}" if not isinstance(feat, torch.Tensor)
                        else f"a {feat.dtype} tensor of shape {tuple(feat.shape)}")
                raise ModelError(f"early_exit: block '{name}' returns {what}; an exit head "
                                 f"needs a float [batch, channels, ...] tensor (batch {n}); "
                                 "put the exit after another block")
            for v in state:  # None (an absent mask) passes through as it is
                if v is not None and (not isinstance(v, torch.Tensor) or v.dim() == 0
                                      or v.shape[0] != n):
                    what = (type(v).__name__ if not isinstance(v, torch.Tensor)
                            else f"tensor of shape {tuple(v.shape)}")
                    raise ModelError(
                        f"early_exit: cannot stop after block '{name}': the rest of the model "
                        f"also reads a {what} computed before it, which is not one row per "
                        "sample; put the exit after a later block")
            feats.append(feat)
    return feats
