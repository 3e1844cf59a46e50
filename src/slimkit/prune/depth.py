"""Depth pruning: remove whole residual branches, least important first.

Channel pruning shrinks every op but keeps their number; on CPU at small batch a model's time is
largely per op (kernel launch, im2col, normalization passes), so halving the FLOPs of a
ResNet-20 makes PyTorch eager only ~1.3x faster at batch 1. Removing a residual branch
``y = g(s + f(s)) -> g(s)`` deletes all of its ops (Elkerdawy et al., "To filter prune, or to
layer prune, that is the question", ACCV 2020). :mod:`slimkit.graph.branches` finds the
branches; here they are scored, chosen and removed.

Importance of a branch: how much the model's output changes without it, on calibration inputs,
``||y_without - y||^2 / ||y||^2`` (the lesion measure of Veit et al. 2016; label-free), averaged
over the outputs of a model that has several.

Removal rewrites only the module that holds the add: its forward is re-traced with ``torch.fx``
and becomes a ``GraphModule`` with the same class name, the same child module names (so
``state_dict`` keys are unchanged) and without the branch nodes and modules. A plan names the
branches by module and node; replaying it on a freshly built model re-traces and checks them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.graph.branches import Branch, find_branches, trace_module
from slimkit.io import batch as B
from slimkit.io.model import modes_kept, replace_module


def _shallow(module: nn.Module, branches: Sequence[dict[str, Any]], where: str) -> nn.Module:
    """A new GraphModule computing ``module`` without ``branches`` (``module`` is untouched)."""
    gm = trace_module(module)
    nodes = {n.name: n for n in gm.graph.nodes}
    gone: dict[str, str] = {}  # removed add -> its shortcut (a later branch's shortcut may be it)
    for b in branches:
        wanted = [b["add"], b["shortcut"], *b["nodes"]]
        if any(n not in nodes for n in wanted):
            raise ConfigError(f"depth plan: module '{where or '(model)'}' has no residual add "
                              f"'{b['add']}' with that branch; the plan was made for another "
                              "architecture")
        short = b["shortcut"]
        while short in gone:
            short = gone[short]
        gone[b["add"]] = short
        add = nodes[b["add"]]
        add.replace_all_uses_with(nodes[short])
        gm.graph.erase_node(add)
        for name in reversed(b["nodes"]):
            gm.graph.erase_node(nodes[name])
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.train(module.training)
    return gm


def remove_branches(model: nn.Module, branches: Sequence[dict[str, Any]]) -> nn.Module:
    """Remove the given branches from ``model`` in place.

    Args:
        model: the model (its block modules are replaced).
        branches: :class:`~slimkit.graph.branches.Branch` dicts (a plan's ``blocks``).

    Returns:
        The model; a new object only when a branch sits in the model's own forward.

    Raises:
        ConfigError: a branch the model does not have (a plan for another architecture).
    """
    by_module: dict[str, list[dict[str, Any]]] = {}
    for b in branches:
        by_module.setdefault(b["module"], []).append(b)
    # Innermost first, so an outer module's re-trace sees its already-rewritten children.
    for name in sorted(by_module, key=lambda n: -n.count(".") - bool(n)):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"depth plan: the model has no module '{name}'; the plan was "
                              "made for another architecture") from None
        model = replace_module(model, name, _shallow(module, by_module[name], name))
    return model


def output_change(model: nn.Module, inputs: B.Inputs, reference: Any) -> float:
    """``||model(inputs) - reference||^2 / ||reference||^2`` in float64, in eval mode.

    For a model with several outputs (a tuple, a dict, a ``ModelOutput``), the mean of that
    relative change over every output (:func:`slimkit.io.batch.flatten`), so each output
    counts alike whatever its scale. A NaN or Inf output counts as an infinite change (never
    the smallest).

    Args:
        model: the model (its modes are restored).
        inputs: a batch as the model takes it (:mod:`slimkit.io.batch`).
        reference: the outputs to compare with, as the model returns them.

    Raises:
        ModelError: the model returns no tensor, or other outputs than ``reference``.
    """
    with modes_kept(model), torch.no_grad():
        out = B.flatten(B.call(model.eval(), inputs))
    ref = B.flatten(reference)
    if not ref or list(out) != list(ref):
        raise ModelError(f"output change needs the outputs {list(ref)} of the reference; "
                         f"{type(model).__name__} returned {list(out) or 'no tensor'}")
    changes = []
    for name, r in ref.items():
        o, r = out[name].double(), r.double()
        if o.shape != r.shape:
            return math.inf
        changes.append(float(((o - r) ** 2).sum()) / (float((r ** 2).sum()) or 1.0))
    change = sum(changes) / len(changes)
    return change if math.isfinite(change) else math.inf


def score_branches(model: nn.Module, branches: Sequence[Branch],
                   inputs: B.Inputs) -> list[float]:
    """Relative output change ``||y_without - y||^2 / ||y||^2`` of removing each branch alone
    (every output counts, see :func:`output_change`)."""
    scores = []
    with modes_kept(model), torch.no_grad():
        ref = B.call(model.eval(), inputs)
        for b in branches:
            module = model.get_submodule(b.module)
            trial = replace_module(model, b.module, _shallow(module, [b.as_dict()], b.module))
            try:
                scores.append(output_change(trial, inputs, ref))
            finally:
                replace_module(model, b.module, module)
    return scores


def rank_branches(model: nn.Module, example: B.Inputs, inputs: B.Inputs,
                  excluded: Callable[[str], bool] | None = None,
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Removable branches, least important first, each with its ``score``; and what was skipped.

    Args:
        model: the model (not modified).
        example: inputs to find the branches with (a batch as the model takes it).
        inputs: calibration inputs to score them on (a batch as the model takes it).
        excluded: ``name -> bool``: branches touching such a module are kept (and reported).
    """
    found, skipped = find_branches(model, example)
    keep = []
    for b in found:
        hit = [m for m in b.modules if excluded and excluded(m)]
        if hit:
            skipped.append({"what": f"block {b.module}/{b.add}",
                            "why": f"its branch holds excluded layer {hit[0]}"})
        else:
            keep.append(b)
    scores = score_branches(model, keep, inputs)
    ranked = sorted(({**b.as_dict(), "score": s} for b, s in zip(keep, scores, strict=True)),
                    key=lambda d: d["score"])
    return ranked, skipped


def without_branches(model: nn.Module, branches: Sequence[dict[str, Any]]) -> nn.Module:
    """A copy of ``model`` without ``branches`` (``model`` itself is left alone)."""
    return remove_branches(copy.deepcopy(model), branches) if branches else model


__all__ = ["output_change", "rank_branches", "remove_branches", "score_branches",
           "without_branches"]
