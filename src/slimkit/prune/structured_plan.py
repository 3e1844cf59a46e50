"""Structured pruning plans: which groups, which channels, and how a plan replays on a model.

A plan is JSON: per group the kept channel indices, per tensor the kept indices along each
dim, head counts, head sizes and query scale factors, plus what was skipped and why. It is
computed from a dependency graph (:mod:`slimkit.graph.dependency`) but replays without one
(:func:`apply_structured`), so a saved plan rebuilds the pruned structure of a freshly built
model; the artifact rebuilder registered here does exactly that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.stages import register_rebuilder
from slimkit.data.bundle import DataBundle
from slimkit.graph.dependency import (
    DependencyGraph,
    Group,
    build_dependency_graph,
    module_in_traceback,
)
from slimkit.graph.select import select_layers
from slimkit.io import batch as B
from slimkit.prune.allocate import ALLOCATORS, AllocRequest, tie_counts
from slimkit.prune.criteria import CRITERIA, ScoreInputs, taylor_grads
from slimkit.prune.depth import remove_branches
from slimkit.prune.hf_loadable import constrain, loadable_scopes
from slimkit.prune.slicer import apply_slices
from slimkit.prune.structured_config import StructuredPruneConfig
from slimkit.prune.unfuse import unfuse_mha

PLAN_FORMAT = "slimkit-structured-plan"


@dataclass(frozen=True)
class Selection:
    """``include``/``exclude`` resolved on one model (selectors checked once, then passed along).

    Attributes:
        chosen: the layers ``include`` chooses (minus exact ``exclude`` matches).
        excluded: the layers ``exclude`` matches; each covers its submodules.
        narrowed: whether ``include`` was given (otherwise every root is chosen).
    """

    chosen: frozenset[str]
    excluded: frozenset[str]
    narrowed: bool

    def covers(self, name: str) -> bool:
        """Whether ``name`` is an excluded module or inside one."""
        return any(name == e or name.startswith(f"{e}.") for e in self.excluded)


def select(model: nn.Module, cfg: StructuredPruneConfig) -> Selection:
    """Resolve ``cfg.include``/``cfg.exclude`` on ``model``.

    Raises:
        ConfigError: a selector matches no layer (naming the closest one).
    """
    types = {type(m).__name__ for m in model.modules()}
    chosen, _ = select_layers(model, types, cfg.include, cfg.exclude)  # validates selectors
    excluded: set[str] = set()
    if cfg.exclude:
        _, skipped = select_layers(model, types, (), cfg.exclude)
        excluded = {s["what"] for s in skipped}
    return Selection(frozenset(chosen), frozenset(excluded), bool(cfg.include))


@dataclass(frozen=True)
class Job:
    """What every step of one pruning run shares.

    Attributes:
        cfg: the config.
        data: calibration data (``taylor``, block scores), or None.
        example: the inputs the model is traced, measured and verified with (a batch as the
            model takes it: a tuple of positional inputs or a dict of keyword ones).
        selection: ``include``/``exclude`` resolved on the model being pruned.
    """

    cfg: StructuredPruneConfig
    data: DataBundle | None
    example: B.Inputs
    selection: Selection


def selected_groups(model: nn.Module, graph: DependencyGraph, cfg: StructuredPruneConfig,
                    selection: Selection) -> tuple[list[Group], list[dict[str, str]]]:
    """Prunable groups after include/exclude, and the skipped ones with the reason."""
    skipped: list[dict[str, str]] = []
    if cfg.attention == "head_dims" and not any(g.head_dims for g in graph.groups):
        skipped.append({"what": "attention head_dims",
                        "why": "no attention head split (a dim reshaped into heads x head_dim "
                               "inside q/k/v attention) was found; no head dims were pruned"})
    groups = []
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for g in graph.groups:
        if not g.param_names() & params:
            continue  # index buffers (position ids...): not layers, nothing to report
        what = g.describe()
        hit = sorted(m for m in g.modules() if selection.covers(m))
        if not g.prunable:
            skipped.append({"what": what, "why": "; ".join(g.why)})
        elif hit:
            skipped.append({"what": what, "why": f"touches excluded layer {hit[0]}"})
        elif selection.narrowed and g.root not in selection.chosen:
            skipped.append({"what": what, "why": "root not matched by include"})
        else:
            groups.append(g)
    return groups, skipped


def _calibration(model: nn.Module, data: DataBundle | None, cfg: StructuredPruneConfig,
                 ) -> dict[str, torch.Tensor] | None:
    if cfg.criterion != "taylor":
        return None
    if data is None:
        raise ConfigError("structured_prune: criterion 'taylor' needs calibration data "
                          "(give data / --data)")
    x, y = data.calibration_batch(cfg.calib_batches * cfg.calib_batch_size, cfg.seed)
    bs = cfg.calib_batch_size
    batches = [(B.take(x, slice(i, i + bs)), y[i:i + bs]) for i in range(0, B.size(x), bs)]
    return taylor_grads(model, batches)


def score_groups(model: nn.Module, groups: list[Group], cfg: StructuredPruneConfig,
                 data: DataBundle | None = None) -> dict[int, np.ndarray]:
    """Importance of every channel of every group (higher = keep), by ``cfg.criterion``."""
    grads = _calibration(model, data, cfg)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fn = CRITERIA.get(cfg.criterion)
    return {g.id: np.asarray(fn(ScoreInputs(g, params, modules, grads, cfg.seed)))
            for g in groups}


class RatioPlanner:
    """Plans of one model for any ratio: its graph, selected groups and scores computed once.

    Example:
        >>> planner = RatioPlanner(net, job)
        >>> small, plan = planner.prune(0.3)
    """

    def __init__(self, model: nn.Module, job: Job) -> None:
        self.model, self.cfg = model, job.cfg
        self.graph = build_dependency_graph(model, job.example, job.cfg.attention)
        self.groups, self.skipped = selected_groups(model, self.graph, job.cfg, job.selection)
        # hf_loadable: inside a transformers model, only the widths its config can say,
        # one count per config key (slimkit.prune.hf_loadable)
        scopes, notes = loadable_scopes(model, job.cfg.hf_loadable, job.cfg.attention)
        self.groups, self.ties, held = constrain(scopes, self.groups)
        self.skipped = [*self.skipped, *notes, *held]
        self.loadable = [s.owner.name for s in scopes]
        self.scores = score_groups(model, self.groups, job.cfg, job.data)

    def plan(self, ratio: float) -> dict[str, Any]:
        """The plan removing ``ratio`` of the selected groups' channels (by the allocator)."""
        cfg, groups, scores = self.cfg, self.groups, self.scores
        req = AllocRequest({g.id: g.size for g in groups}, scores, ratio, cfg.max_layer_ratio,
                           cfg.round_to, {g.id: bool(g.head_dims) or (not g.heads
                                                                      and _one_index(g))
                                          for g in groups})
        keep = tie_counts(ALLOCATORS.get(cfg.allocation)(req), self.ties, req) if groups else {}
        plan_groups = []
        for g in groups:
            order = np.argsort(-scores[g.id], kind="stable")[:keep[g.id]]
            plan_groups.append({"id": g.id, "root": g.root, "size": g.size,
                                "keep": sorted(int(i) for i in order), "heads": g.heads,
                                "head_dims": g.head_dims})
        plan = build_plan(self.model, self.graph, plan_groups, self.skipped)
        if self.loadable:
            plan["hf_loadable"] = self.loadable  # transformers models kept loadable (by name)
        return plan

    def prune(self, ratio: float) -> tuple[nn.Module, dict[str, Any]]:
        """A pruned copy for ``ratio``, and its plan."""
        plan = self.plan(ratio)
        return apply_structured(self.model, plan), plan


def _one_index(g: Group) -> bool:
    """Channels are single channels (not heads or conv groups spanning several indices)."""
    return all(len(ix) == 1 for m in g.members if m.dim == 0 for ix in m.indices[:1])


def build_plan(model: nn.Module, graph: DependencyGraph, plan_groups: list[dict[str, Any]],
               skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The JSON plan: per group the kept channels, per tensor the kept indices per dim."""
    by_id = {g.id: g for g in graph.groups}
    removed: dict[tuple[str, int], set[int]] = {}
    heads: dict[str, int] = {}
    head_dims: dict[str, int] = {}
    scale: dict[str, float] = {}
    for pg in plan_groups:
        g = by_id[pg["id"]]
        gone = sorted(set(range(g.size)) - set(pg["keep"]))
        if not gone:
            continue
        for m in g.members:
            removed.setdefault((m.param, m.dim), set()).update(
                i for c in gone for i in m.indices[c])
        for mod in g.heads:
            heads[mod] = len(pg["keep"])
        for mod in g.head_dims:
            head_dims[mod] = len(pg["keep"])
        for param in g.queries:  # q' * sqrt(d'/d) / sqrt(d') == q / sqrt(d): the scale stays
            scale[param] = float(np.sqrt(len(pg["keep"]) / g.size))
    shapes = {n: t.shape for n, t in [*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)]}
    slices: dict[str, dict[str, list[int]]] = {}
    for (param, dim), gone_ix in sorted(removed.items()):
        keep = [i for i in range(shapes[param][dim]) if i not in gone_ix]
        slices.setdefault(param, {})[str(dim)] = keep
    return {"format": PLAN_FORMAT, "version": 1, "groups": plan_groups, "slices": slices,
            "heads": heads, "head_dims": head_dims, "scale": scale, "skipped": skipped,
            "unsupported": graph.unsupported}


def unfused_copy(model: nn.Module, selection: Selection,
                 ) -> tuple[nn.Module, list[str], list[dict[str, str]]]:
    """A copy whose ``nn.MultiheadAttention`` modules are unfused, so their heads can be pruned.

    Excluded ones stay fused (and fixed). Returns the copy (``model`` itself when it has no
    ``nn.MultiheadAttention``), the swapped names, and those left fused with the reason.
    """
    mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mhas:
        return model, [], []
    work = copy.deepcopy(model)
    swapped, skipped = unfuse_mha(work, skip={n for n in mhas if selection.covers(n)})
    return work, swapped, skipped


def with_unfused(plan: dict[str, Any], unfused: list[str],
                 skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The plan, replaying the attention swap first (every plan: any one may be replayed)."""
    return {**plan, "unfused_mha": unfused,
            "skipped": skipped + [k for k in plan["skipped"] if k not in skipped]}


def pruned_failure(model: nn.Module, exc: Exception) -> ModelError:
    """The error for a pruned model whose forward fails: the module, and how to leave it alone.

    Pruning resizes tensors, not code: a module that hard-codes a channel count (or derives
    one at run time from an input size, as ``C // self.heads``) fails on the smaller tensors.
    """
    where = module_in_traceback(model, exc)
    name = where.split(" ")[0]
    return ModelError(f"the pruned model fails in module '{where}' on the example inputs "
                      f"({type(exc).__name__}: {str(exc)[:200]}); it probably hard-codes a "
                      f"channel count: leave it alone with exclude: ['{name}']")


def apply_structured(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """A physically smaller copy of ``model`` with only the planned channels.

    Args:
        model: the model the plan was made for (or a fresh build of its architecture).
        plan: from :func:`plan_structured` (or ``record.details["plans"][i]``), possibly
            after a JSON round trip.

    Returns:
        A new module with smaller parameters and updated size attributes.

    Raises:
        ConfigError: the plan is not a structured-prune plan or names missing tensors.

    Example:
        >>> plan = json.loads(Path("plan.json").read_text())
        >>> small = apply_structured(build_model("resnet20", (3, 32, 32), 10), plan)
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not a structured-prune plan (format {plan.get('format')!r}, "
                          f"expected {PLAN_FORMAT!r})")
    new = replay_plan(copy.deepcopy(model), plan)
    if changes_structure(plan) and hasattr(new, "slimkit_spec"):
        del new.slimkit_spec  # the zoo spec alone rebuilds the unpruned sizes: the plan is needed
    return new


def replay_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Slice ``model`` in place by ``plan`` (tensors, head counts, head sizes, query scales).

    The plan's ``nn.MultiheadAttention`` modules are first unfused (:mod:`slimkit.prune.unfuse`)
    and its residual branches removed (:mod:`slimkit.prune.depth`); the returned model is a
    new object only when a branch sat in the model's own forward.
    """
    if plan.get("unfused_mha"):
        unfuse_mha(model, only=plan["unfused_mha"])
    if plan.get("blocks"):
        model = remove_branches(model, plan["blocks"])
    return apply_slices(model, plan["slices"], plan.get("heads"), plan.get("head_dims"),
                        plan.get("scale"))


def changes_structure(plan: dict[str, Any]) -> bool:
    """Whether replaying ``plan`` changes the architecture (so an artifact must replay it)."""
    return bool(plan["slices"] or plan.get("unfused_mha") or plan.get("blocks"))


@register_rebuilder("structured_prune")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the pruned structure of ``plan``."""
    return replay_plan(model, plan)


__all__ = ["PLAN_FORMAT", "Job", "RatioPlanner", "Selection", "apply_structured", "build_plan",
           "changes_structure", "pruned_failure", "replay_plan",
           "score_groups", "select", "selected_groups", "unfused_copy", "with_unfused"]
