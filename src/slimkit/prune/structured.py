"""Structured pruning through a dependency graph: physically smaller models, any architecture.

API
---
``StructuredPruneConfig``  (kind ``structured_prune``) what to remove: ``ratio`` (share of the
    channels of every prunable group) OR ``target`` (``{"flops": 0.5}`` = keep 50% of the
    measured FLOPs; also ``params`` and ``latency``, together if wanted), ``blocks`` (depth
    pruning first: a share of the removable residual branches, or ``auto``; see
    :mod:`slimkit.prune.depth`), ``criterion`` (``CRITERIA``: l1, l2,
    taylor, bn_scale, fpgm, random), ``allocation`` (``ALLOCATORS``: uniform, global),
    ``round_to``, ``max_layer_ratio``, ``include``/``exclude`` (names, ``re:``, ``type:``),
    ``calib_batches``, ``finetune`` and ``steps`` (iterative prune -> fine-tune cycles),
    ``attention`` (``heads``: remove whole attention heads; ``head_dims``: remove positions
    inside every head, so all heads keep one smaller head size and the softmax scale stays
    ``1/sqrt(original head size)``).
``structured_prune(model, cfg, data=None, teacher=None, progress=False, checkpoint_dir=None,
    example_inputs=None) -> (pruned_copy, Record)``: the whole technique; the input model is
    never modified.
``plan_structured(model, cfg, data=None, example_inputs=None) -> plan``: JSON plan (per group
    the kept channel indices; per tensor the kept indices along each dim; head counts, head
    sizes, query scale factors).
``apply_structured(model, plan) -> new model``: slices a copy by the plan (no graph needed, so
    a saved plan replays on a freshly built model; the artifact rebuilder does exactly that).
``slimkit.graph.dependency.analyze(model, example_inputs)``: what can and cannot be pruned,
    and why, before any work starts.

How it works: :mod:`slimkit.graph.dependency` captures the model with ``torch.export`` and
groups coupled channels (conv -> BN -> next conv, residual adds, concat, split/chunk,
flatten -> Linear, depthwise and grouped convs, attention heads, embeddings); a criterion scores
each group's channels over all of its parameters; an allocator decides how many to keep; the
slicer builds new, smaller ``nn.Parameter`` s and updates ``in_channels``/``out_features``/
``num_features``/``normalized_shape``/``groups``/head counts/head sizes. Nothing is masked.
``nn.MultiheadAttention`` modules are first swapped, on the copy, for the equivalent
:class:`~slimkit.prune.unfuse.UnfusedMultiheadAttention` (q/k/v/out ``nn.Linear``), so that their
heads and head dims can be pruned; the plan lists them (``unfused_mha``) and replays the swap
first. Those it cannot represent (``add_bias_kv``, ``add_zero_attn``) or that are excluded stay
fused with their sizes, and are listed in ``skipped``.
A Hugging Face model's ``config`` is updated to the pruned sizes where it can describe them
(:func:`slimkit.io.hf.sync_hf_config`); what it cannot describe is listed in ``skipped``.

Example:
    >>> cfg = StructuredPruneConfig(ratio=0.5, criterion="l2", round_to=8)
    >>> small, record = structured_prune(model, cfg, example_inputs=(torch.randn(1, 3, 32, 32),))
    >>> record.details["params"]        # {"before": ..., "after": ...}
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_rebuilder, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_indices
from slimkit.distill.run import FinetuneConfig, finetune
from slimkit.graph.dependency import (
    DependencyGraph,
    Group,
    build_dependency_graph,
    module_in_traceback,
)
from slimkit.graph.select import select_layers
from slimkit.io.hf import sync_hf_config
from slimkit.io.model import SlimModel, modes_kept
from slimkit.measure.relative import Fractions, fractions_of
from slimkit.prune.allocate import ALLOCATORS, AllocRequest, search_ratio
from slimkit.prune.criteria import CRITERIA, ScoreInputs, taylor_grads
from slimkit.prune.depth import (
    output_change,
    rank_branches,
    remove_branches,
    without_branches,
)
from slimkit.prune.slicer import apply_slices
from slimkit.prune.slimming import SlimmingConfig, slimming_train
from slimkit.prune.unfuse import unfuse_mha
from slimkit.train.bn import recalibrate_batchnorm

PLAN_FORMAT = "slimkit-structured-plan"
TARGET_KEYS = ("flops", "params", "latency")


def _known(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except ConfigError as exc:  # a ValueError, so recipes report it under its key path
        raise ValueError(str(exc)) from None
    return name


class StructuredPruneConfig(SlimConfig):
    """Remove whole channels, heads and conv groups; the model gets physically smaller."""

    kind: Literal["structured_prune"] = "structured_prune"
    version: Literal[1] = Field(1, description="Config schema version.")
    ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Share of the channels of the prunable groups to "
                                          "remove (0 <= ratio < 1). Give ratio OR target.")
    target: dict[str, float] | None = Field(
        None, description="Measured goal instead of a ratio: {'flops': 0.5} keeps 50% of the "
                          "FLOPs; also 'params' and 'latency' (torch eager, batch of the "
                          "example inputs), alone or together (all must be met). Pruning grows "
                          "until the measurements reach it; the record says achieved vs asked.")
    blocks: float | Literal["auto"] = Field(
        0.0, description="Depth pruning, before channels: share (0..1) of the removable "
                         "residual blocks (y = x + f(x), identity shortcut) whose branch f is "
                         "removed whole, those the output depends on least first. 'auto' "
                         "(with a target holding 'latency' and 'flops' or 'params'): of the "
                         "block counts with which channel pruning meets every target, the "
                         "one whose output on the calibration data (BatchNorm statistics "
                         "re-estimated) moves least; without data, the one keeping the most "
                         "FLOPs (params). With steps > 1 the channels are then pruned in "
                         "steps (the search's width step is not reused). Removing blocks "
                         "cuts latency where channel pruning cannot: small convolutions on "
                         "CPU cost per op, not per FLOP.")
    criterion: str = Field("l2", description="Importance criterion: l1, l2, taylor, bn_scale, "
                                             "fpgm, random.")
    allocation: str = Field("global", description="uniform: same ratio per group; global: one "
                                                  "ranking across groups.")
    round_to: int = Field(1, ge=1, description="Kept channel counts are a multiple of this "
                                               "(e.g. 8 for fast kernels).")
    max_layer_ratio: float = Field(0.9, gt=0.0, lt=1.0,
                                   description="Never remove more than this share of a group.")
    include: list[str] = Field(default_factory=list,
                               description="Only prune groups rooted at these layers "
                                           "(name, re:REGEX, type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers' tensors untouched (name, "
                                           "re:REGEX, type:Class).")
    latency_threads: int = Field(1, ge=1, description="Threads when timing a latency target "
                                                      "(1 gives the steadiest measurement).")
    latency_batches: list[int] | None = Field(
        None, description="Batch sizes a latency target is timed at (the example inputs "
                          "cycled to each size); the slowest ratio counts. Default: the "
                          "example inputs as given.")
    calib_batches: int = Field(4, ge=1, description="Batches of training data (class-"
                                                    "stratified) for the taylor criterion, "
                                                    "block scores and BatchNorm re-estimation.")
    calib_batch_size: int = Field(32, ge=1, description="Samples per calibration batch.")
    steps: int = Field(1, ge=1, description="Prune in this many equal steps, fine-tuning after "
                                            "each one when finetune is set.")
    seed: int = Field(0, description="Seed of the random criterion and of the calibration "
                                     "sample.")
    attention: Literal["heads", "head_dims"] = Field(
        "heads", description="How attention shrinks: 'heads' removes whole heads; 'head_dims' "
                             "removes the same positions inside every head of q/k/v (and the "
                             "out-projection inputs they feed), so all heads keep one smaller "
                             "head size; the softmax scale stays 1/sqrt(original head size).")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune after pruning (after each step), optionally distilled from "
                          "the unpruned model (finetune.distill).")
    slimming: SlimmingConfig | None = Field(
        None, description="Network Slimming: first train with an L1 penalty on the "
                          "normalization scales, then prune (pair with criterion bn_scale).")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        return _known(CRITERIA, v)

    @field_validator("allocation")
    @classmethod
    def _known_allocation(cls, v: str) -> str:
        return _known(ALLOCATORS, v)

    @field_validator("target")
    @classmethod
    def _valid_target(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v or not set(v) <= set(TARGET_KEYS):
            raise ValueError(f"target keys must be among {list(TARGET_KEYS)}, got {sorted(v)}")
        for key, frac in v.items():
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"target {key} must be in (0, 1] (share to keep), got {frac}")
        return {k: v[k] for k in TARGET_KEYS if k in v}  # primary metric first

    @field_validator("latency_batches")
    @classmethod
    def _positive_batches(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"latency_batches must be positive batch sizes, got {v}")
        return v

    @field_validator("blocks")
    @classmethod
    def _valid_blocks(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"blocks must be a share in [0, 1] or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _ratio_or_target(self) -> StructuredPruneConfig:
        if (self.ratio is None) == (self.target is None):
            raise ValueError("give exactly one of ratio (share of channels to remove) or "
                             "target (e.g. {'flops': 0.5})")
        if self.blocks == "auto" and not (self.target and "latency" in self.target
                                          and len(self.target) > 1):
            raise ValueError("blocks 'auto' picks how many residual blocks to remove so that "
                             "pruning to a flops/params target also meets a latency target: "
                             "give target with 'latency' and 'flops' or 'params', or a share")
        return self


def _example(model: nn.Module, data: DataBundle | None,
             example_inputs: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        return tuple(example_inputs)
    if data is not None:
        return (data.x_train[:2],)
    raise ConfigError("structured_prune needs example_inputs (or data) to trace the model")


def _selected_groups(model: nn.Module, graph: DependencyGraph,
                     cfg: StructuredPruneConfig) -> tuple[list[Group], list[dict[str, str]]]:
    """Prunable groups after include/exclude, and the skipped ones with the reason."""
    chosen, excluded = _selection(model, cfg)
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
        what = f"group {g.id} ({g.root}, {g.size} channels)"
        hit = sorted(m for m in g.modules() if _covered(m, excluded))
        if not g.prunable:
            skipped.append({"what": what, "why": "; ".join(g.why)})
        elif hit:
            skipped.append({"what": what, "why": f"touches excluded layer {hit[0]}"})
        elif cfg.include and g.root not in chosen:
            skipped.append({"what": what, "why": "root not matched by include"})
        else:
            groups.append(g)
    return groups, skipped


def _selection(model: nn.Module, cfg: StructuredPruneConfig,
               ) -> tuple[dict[str, nn.Module], set[str]]:
    """The layers ``include`` chooses, and the names ``exclude`` matches (selectors checked)."""
    types = {type(m).__name__ for m in model.modules()}
    chosen, _ = select_layers(model, types, cfg.include, cfg.exclude)  # validates selectors
    if not cfg.exclude:
        return chosen, set()
    _, skipped = select_layers(model, types, (), cfg.exclude)
    return chosen, {s["what"] for s in skipped}


def _covered(name: str, excluded: set[str]) -> bool:
    """An excluded module covers its submodules."""
    return any(name == e or name.startswith(f"{e}.") for e in excluded)


def _unfused_copy(model: nn.Module, cfg: StructuredPruneConfig,
                  ) -> tuple[nn.Module, list[str], list[dict[str, str]]]:
    """A copy whose ``nn.MultiheadAttention`` modules are unfused, so their heads can be pruned.

    Excluded ones stay fused (and fixed). Returns the copy (``model`` itself when it has no
    ``nn.MultiheadAttention``), the swapped names, and those left fused with the reason.
    """
    mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mhas:
        return model, [], []
    _, excluded = _selection(model, cfg)
    work = copy.deepcopy(model)
    swapped, skipped = unfuse_mha(work, skip={n for n in mhas if _covered(n, excluded)})
    return work, swapped, skipped


def _with_unfused(plan: dict[str, Any], unfused: list[str],
                  skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The plan, replaying the attention swap first (every plan: any one may be replayed)."""
    return {**plan, "unfused_mha": unfused,
            "skipped": skipped + [k for k in plan["skipped"] if k not in skipped]}


def _calibration(model: nn.Module, data: DataBundle | None, cfg: StructuredPruneConfig,
                 ) -> dict[str, torch.Tensor] | None:
    if cfg.criterion != "taylor":
        return None
    if data is None:
        raise ConfigError("structured_prune: criterion 'taylor' needs calibration data "
                          "(give data / --data)")
    idx = _calib_indices(data, cfg)
    x, y = data.x_train[idx], data.y_train[idx]
    bs = cfg.calib_batch_size
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
    return taylor_grads(model, batches)


def _calib_indices(data: DataBundle, cfg: StructuredPruneConfig) -> torch.Tensor:
    """The calibration samples (every class, not a sorted prefix), seed-determined."""
    return calibration_indices(data, cfg.calib_batches * cfg.calib_batch_size, cfg.seed)


def score_groups(model: nn.Module, groups: list[Group], cfg: StructuredPruneConfig,
                 data: DataBundle | None = None) -> dict[int, np.ndarray]:
    """Importance of every channel of every group (higher = keep), by ``cfg.criterion``."""
    grads = _calibration(model, data, cfg)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    fn = CRITERIA.get(cfg.criterion)
    return {g.id: np.asarray(fn(ScoreInputs(g, params, modules, grads, cfg.seed)))
            for g in groups}


def _plan_for_ratio(model: nn.Module, graph: DependencyGraph, groups: list[Group],
                    scores: dict[int, np.ndarray], ratio: float, cfg: StructuredPruneConfig,
                    skipped: list[dict[str, str]]) -> dict[str, Any]:
    req = AllocRequest({g.id: g.size for g in groups}, scores, ratio, cfg.max_layer_ratio,
                       cfg.round_to, {g.id: bool(g.head_dims) or (not g.heads and _one_index(g))
                                      for g in groups})
    keep = ALLOCATORS.get(cfg.allocation)(req) if groups else {}
    plan_groups = []
    for g in groups:
        order = np.argsort(-scores[g.id], kind="stable")[:keep[g.id]]
        plan_groups.append({"id": g.id, "root": g.root, "size": g.size,
                            "keep": sorted(int(i) for i in order), "heads": g.heads,
                            "head_dims": g.head_dims})
    return build_plan(model, graph, plan_groups, skipped)


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


def plan_structured(model: nn.Module, cfg: StructuredPruneConfig,
                    data: DataBundle | None = None,
                    example_inputs: Sequence[torch.Tensor] | None = None,
                    ratio: float | None = None) -> dict[str, Any]:
    """Plan which channels to keep, for ``cfg.ratio``, ``cfg.target`` or the given ``ratio``.

    Args:
        model: the model (not modified).
        cfg: the config; with ``cfg.target`` the ratio is searched by measuring pruned copies
            and the plan gets a ``target`` entry (ratio, achieved, asked, reached). ``steps``
            and ``finetune`` are ignored here (see :func:`structured_prune`).
        data: calibration data (needed by ``taylor``).
        example_inputs: inputs to trace with (default: two training samples of ``data``).
        ratio: overrides ``cfg.ratio``.

    Returns:
        ``{"format", "version", "groups": [{"id", "root", "size", "keep", "heads",
        "head_dims"}], "slices": {tensor: {dim: kept indices}}, "heads": {module: count},
        "head_dims": {module: head size}, "scale": {query tensor: factor}, "skipped",
        "unfused_mha": [attention modules swapped for UnfusedMultiheadAttention first],
        "blocks": [residual branches removed before slicing (module, add, nodes, score)]}``.

    Raises:
        ConfigError: unknown layer names in include/exclude (naming the closest), taylor
            without data.
        ModelError: the model cannot be captured.

    Example:
        >>> plan = plan_structured(net, StructuredPruneConfig(ratio=0.3), example_inputs=(x,))
        >>> small = apply_structured(net, plan)
    """
    example = _example(model, data, example_inputs)
    work, unfused, unfuse_skipped = _unfused_copy(model, cfg)
    if ratio is not None and cfg.blocks == "auto":
        raise ConfigError("plan_structured: blocks 'auto' searches toward cfg.target; it "
                          "cannot be combined with a fixed ratio (give blocks as a share)")
    target = _target(cfg, example, work) if ratio is None else None
    blocks: list[dict[str, Any]] = []
    searched = None
    if cfg.blocks:
        work, blocks, _, searched = _depth(work, cfg, data, example, target)
    if searched is not None:  # blocks: auto already took the width step
        _, plan, found = searched
    else:
        r = cfg.ratio if ratio is None else ratio
        _, plan, found = _step(work, cfg, data, example, r, target)
    if found is not None:
        plan["target"] = _target_summary(found, [found])
    return _with_unfused({**plan, "blocks": blocks}, unfused, unfuse_skipped)


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


Step = tuple[nn.Module, dict[str, Any], dict[str, Any]]  # pruned model, plan, target record


def _target(cfg: StructuredPruneConfig, example: tuple[torch.Tensor, ...],
            base: nn.Module) -> tuple[Fractions, dict[str, float]] | None:
    """The measurements of ``cfg.target`` (fractions of ``base``) and the asked shares."""
    if cfg.target is None:
        return None
    return (fractions_of(base, list(cfg.target), example, cfg.latency_threads,
                         cfg.latency_batches), dict(cfg.target))


def _step(model: nn.Module, cfg: StructuredPruneConfig, data: DataBundle | None,
          example: tuple[torch.Tensor, ...], ratio: float | None,
          target: tuple[Fractions, dict[str, float]] | None,
          ) -> tuple[nn.Module, dict, dict | None]:
    """One prune step: plan (for a ratio, or searching the ratio that meets a target), apply.

    A target is met when every measured fraction is at most its asked share; the search
    bisects on the worst ``measured / asked`` (1 = on target).
    """
    graph = build_dependency_graph(model, example, cfg.attention)
    groups, skipped = _selected_groups(model, graph, cfg)
    scores = score_groups(model, groups, cfg, data)

    def make(r: float) -> tuple[nn.Module, dict]:
        plan = _plan_for_ratio(model, graph, groups, scores, r, cfg, skipped)
        return apply_structured(model, plan), plan

    if target is None:
        pruned, plan = make(ratio or 0.0)
        return pruned, plan, None
    fractions, asked = target
    result = search_ratio(lambda r: _worst(make(r)[0], fractions, asked), 1.0,
                          cfg.max_layer_ratio)
    pruned, plan = make(result.ratio)
    # "reached" is the search's verdict on the ratio it chose; "achieved" is measured again
    # (latency may differ by noise; the final record re-measures and says so).
    achieved = {k: f(pruned) for k, f in fractions.items()}
    return pruned, plan, {"ratio": result.ratio, "asked": asked, "achieved": achieved,
                          "reached": result.reached, "trials": result.trials}


def _worst(model: nn.Module, fractions: Fractions, asked: dict[str, float]) -> float:
    return max(f(model) / asked[k] for k, f in fractions.items())


def _depth(model: nn.Module, cfg: StructuredPruneConfig, data: DataBundle | None,
           example: tuple[torch.Tensor, ...], target: tuple[Fractions, dict[str, float]] | None,
           ) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any], Step | None]:
    """Remove the chosen residual branches (``cfg.blocks``).

    Returns the model, the branches, the details and, with ``auto``, the width step that the
    winning candidate already took (model, plan, target record), so it is not searched again.
    """
    _, excluded = _selection(model, cfg)
    inputs = (data.x_train[_calib_indices(data, cfg)],) if data is not None else example
    ranked, skipped = rank_branches(model, example, inputs, lambda m: _covered(m, excluded))
    trials: list[dict[str, Any]] = []
    step, judge = None, None
    if cfg.blocks == "auto":
        assert target is not None  # the config validator guarantees it
        k, step, judge = _auto_blocks(model, cfg, data, example, ranked, target, trials,
                                      inputs)
    else:
        k = round(float(cfg.blocks) * len(ranked))
    chosen = ranked[:k]
    return without_branches(model, chosen), chosen, {
        "removable": len(ranked), "removed": len(chosen), "asked": cfg.blocks,
        "scores": {f"{b['module']}/{b['add']}": b["score"] for b in ranked},
        "trials": trials, "judge": judge, "skipped": skipped}, step


def _auto_blocks(model: nn.Module, cfg: StructuredPruneConfig, data: DataBundle | None,
                 example: tuple[torch.Tensor, ...], ranked: list[dict[str, Any]],
                 target: tuple[Fractions, dict[str, float]], trials: list[dict],
                 inputs: tuple[torch.Tensor, ...]) -> tuple[int, Step, str]:
    """How many blocks to remove: of the ways to meet every target, the one that changes least.

    For k = 0, 1, ... blocks (least important first), channels are pruned to the flops/params
    target, and further where that is not fast enough, until the latency is met too; stops
    at the first k that needs no extra channel pruning. Of the candidates meeting every
    target, the one whose output on the calibration ``inputs`` moves least from the
    original's wins (fewer blocks on a tie; if none meets them, the fastest). Each candidate
    is judged after its BatchNorm statistics are re-estimated on those inputs (on a copy):
    with the stale ones every candidate's output is about 100% off and the measure cannot
    tell them apart (adaptive-BN candidate evaluation, EagleEye, ECCV 2020). Without data
    there is nothing to judge outputs on (one or two example inputs, stale statistics): the
    candidate keeping the most FLOPs (params) wins, fewer blocks on a tie.

    Returns:
        The block count, the winner's width step (pruned model, plan, target record) and
        the rule that picked it.
    """
    fractions, asked = target
    counts = {k: f for k, f in fractions.items() if k != "latency"}
    first = next(iter(counts))  # flops if asked, else params
    reference: torch.Tensor | None = None
    if data is not None:
        with modes_kept(model), torch.no_grad():
            reference = model.eval()(*inputs)

    def change(candidate: nn.Module) -> float:
        assert reference is not None
        candidate = copy.deepcopy(candidate)  # the statistics it returns with stay as pruned
        recalibrate_batchnorm(candidate, inputs, cfg.calib_batch_size)
        return output_change(candidate, inputs, reference)

    best: tuple[tuple, int, Step] | None = None
    for k in range(len(ranked) + 1):
        shallow = without_branches(model, ranked[:k])
        pruned, plan, found = _step(shallow, cfg, data, example, None,
                                    (counts, {c: asked[c] for c in counts}))
        assert found is not None
        lat = fractions["latency"](pruned)
        fast = lat <= asked["latency"]
        if fast:
            found = {**found, "asked": dict(asked), "achieved": {**found["achieved"],
                                                                 "latency": lat}}
        else:  # prune channels further until the latency is met as well
            pruned, plan, found = _step(shallow, cfg, data, example, None, target)
            assert found is not None
        reached = bool(found["reached"])
        trials.append({"blocks": k, "extra_channels": not fast, **found["achieved"],
                       "reached": reached})
        t = trials[-1]
        if not reached:
            rank = (1, t["latency"], k)
        elif reference is None:  # no data to judge outputs on: keep the most of the count
            rank = (0, -t[first], k)
        else:
            t["output_change"] = change(pruned)
            rank = (0, t["output_change"], k)
        if best is None or rank < best[0]:
            best = (rank, k, (pruned, plan, found))
        if fast:
            break
    assert best is not None
    judge = (f"most {first} kept (no data to judge outputs on)" if data is None
             else "least output change after BatchNorm re-estimation")
    return best[1], best[2], judge


def _prune_module(model: nn.Module, cfg: StructuredPruneConfig,
                      data: DataBundle | None = None, teacher: nn.Module | None = None,
                      progress: bool = False, checkpoint_dir: str | Path | None = None,
                      example_inputs: Sequence[torch.Tensor] | None = None,
                      ) -> tuple[nn.Module, Record]:
    """Remove whole channels/heads/conv groups from a copy of ``model``; verify the result.

    Args:
        model: any ``torch.export``-able module (left untouched).
        cfg: the config (ratio or target, criterion, allocation, rounding, selection...).
        data: calibration data (``taylor``) and training data (``finetune``).
        teacher: distillation teacher for ``finetune.distill``; default: the unpruned model.
        progress: show fine-tuning progress.
        checkpoint_dir: where fine-tuning checkpoints go.
        example_inputs: inputs to trace and verify with (default: two samples of ``data``).

    Returns:
        The pruned copy and a Record: ``changed`` one line per resized layer (and per updated
        Hugging Face config key); ``skipped`` the groups left alone and why (and the config
        keys that cannot express per-layer sizes); ``details``: ``layers`` (per
        Conv/Linear/norm channels before/after), ``params``/``flops`` before/after,
        ``unsupported_ops`` (ops without a channel rule, by module; their channels were left
        alone), ``plans`` (one per step, replayable with :func:`apply_structured`),
        ``target`` (asked, achieved, reached) in target mode, ``finetune`` (one training
        summary per step) when fine-tuning.

    Raises:
        ConfigError: bad selectors (naming the closest layer), taylor or finetune without data.
        ModelError: the model cannot be captured, or the pruned model fails / gives NaN/Inf /
            changes its output shape on the example inputs (naming the reason).

    Example:
        >>> small, rec = structured_prune(net, StructuredPruneConfig(target={"flops": 0.5}),
        ...                               example_inputs=(torch.randn(1, 3, 32, 32),))
        >>> rec.details["target"]["achieved"] <= 0.5
        True
    """
    if cfg.finetune is not None and data is None:
        raise ConfigError("structured_prune: finetune needs data (give --data)")
    with modes_kept(model):  # measuring switches modes; the user's model keeps its own
        return _structured_prune(model, cfg, data, teacher, progress, checkpoint_dir,
                                 _example(model, data, example_inputs))


def _structured_prune(model: nn.Module, cfg: StructuredPruneConfig, data: DataBundle | None,
                      teacher: nn.Module | None, progress: bool,
                      checkpoint_dir: str | Path | None,
                      example: tuple[torch.Tensor, ...]) -> tuple[nn.Module, Record]:
    teacher = model if teacher is None else teacher
    ref_shape = _forward(model, example).shape
    # Pruned from here on: the unfused copy (its FLOPs are also the base of a target, as the
    # counter does not see inside the fused nn.MultiheadAttention kernels).
    work, unfused, unfuse_skipped = _unfused_copy(model, cfg)
    target = _target(cfg, example, work)
    current, plans, steps, tuned = work, [], [], []
    slimmed, blocks, depth, searched = None, [], None, None
    if cfg.slimming is not None:
        current = copy.deepcopy(model) if work is model else work
        slimmed = slimming_train(current, cfg.slimming, data, progress)
    if cfg.blocks:
        current, blocks, depth, searched = _depth(current, cfg, data, example, target)
    for s in range(1, cfg.steps + 1):
        if searched is not None and cfg.steps == 1:  # blocks: auto took this step already
            current, plan, tgt = searched
            steps.append(tgt)
        elif target is None:
            done = cfg.ratio * (s - 1) / cfg.steps  # share of the original channels removed
            step_ratio = (cfg.ratio / cfg.steps) / (1.0 - done)
            current, plan, tgt = _step(current, cfg, data, example, step_ratio, None)
        else:
            step_asked = {k: 1.0 - (1.0 - f) * s / cfg.steps for k, f in target[1].items()}
            current, plan, tgt = _step(current, cfg, data, example, None,
                                       (target[0], step_asked))
            steps.append(tgt)
        plans.append(_with_unfused({**plan, "blocks": blocks if s == 1 else []}, unfused,
                                   unfuse_skipped))
        if cfg.finetune is not None and cfg.finetune.epochs > 0:
            tuned.append(finetune(current, data, cfg.finetune, teacher=teacher,
                                  progress=progress, checkpoint_dir=checkpoint_dir,
                                  label=f"structured fine-tune {s}"))
    if current is model:
        current = copy.deepcopy(model)
    _verify(current, example, ref_shape)
    record = _record(work, current, example, plans)
    record.changed = [f"{n}: nn.MultiheadAttention -> UnfusedMultiheadAttention (q/k/v/out "
                      "nn.Linear, same outputs)" for n in unfused] + record.changed
    record.details["unfused_mha"] = unfused
    if depth is not None:
        _record_depth(record, blocks, depth)
    _sync_configs(model, current, record)
    if tuned:
        record.details["finetune"] = tuned
    if slimmed is not None:
        record.details["slimming"] = slimmed
    if target is not None:
        _record_target(record, current, target, steps, cfg.max_layer_ratio)
    return current, record


def _record_depth(record: Record, blocks: list[dict[str, Any]], depth: dict[str, Any]) -> None:
    record.changed = [f"{b['module']}: residual branch removed ({', '.join(b['nodes'])}; "
                      f"{b['params']} params; output change without it {b['score']:.3g})"
                      for b in blocks] + record.changed
    record.skipped += depth["skipped"]
    record.details["blocks"] = {k: v for k, v in depth.items() if k != "skipped"}


def _record(original: nn.Module, pruned: nn.Module, example: tuple[torch.Tensor, ...],
            plans: list[dict[str, Any]]) -> Record:
    from slimkit.measure.counts import count_flops, count_params

    skipped: list[dict[str, str]] = []
    for plan in plans:
        skipped += [k for k in plan["skipped"] if k not in skipped]
    record = Record(skipped=skipped)
    record.details["layers"] = _layer_sizes(original, pruned)
    record.changed = [f"{n}: {v['before']} -> {v['after']} (out, in) channels"
                      for n, v in record.details["layers"].items()]
    record.details["params"] = {"before": count_params(original)["params"],
                                "after": count_params(pruned)["params"]}
    record.details["flops"] = {"before": count_flops(original, example)["flops"],
                               "after": count_flops(pruned, example)["flops"]}
    record.details["plans"] = plans
    record.details["unsupported_ops"] = plans[0]["unsupported"] if plans else []
    return record


def _sync_configs(original: nn.Module, pruned: nn.Module, record: Record) -> None:
    """Hugging Face configs follow the pruned sizes; what they cannot say goes to skipped."""
    changed, skipped = sync_hf_config(original, pruned)
    record.changed += changed
    record.skipped += [s for s in skipped if s not in record.skipped]


def _target_summary(final: dict[str, Any], steps: list[dict]) -> dict[str, Any]:
    """Asked vs achieved: the first target key on top, every key under ``by_metric``."""
    by = {k: {"asked": a, "achieved": final["achieved"][k],
              "reached": final["achieved"][k] <= a + 1e-9} for k, a in final["asked"].items()}
    key = next(iter(by))
    return {"metric": key, "asked": by[key]["asked"], "achieved": by[key]["achieved"],
            "reached": all(v["reached"] for v in by.values()), "by_metric": by, "steps": steps}


def _record_target(record: Record, pruned: nn.Module, target: tuple, steps: list[dict],
                   max_layer_ratio: float) -> None:
    fractions, asked = target
    # Every key is measured on the final model (latency again, in one interleaved window).
    final = {"asked": asked, "achieved": {k: f(pruned) for k, f in fractions.items()}}
    summary = _target_summary(final, steps)
    record.details["target"] = summary
    for key, v in summary["by_metric"].items():
        if not v["reached"]:
            record.skipped.append({"what": f"target {key} {v['asked']}",
                                   "why": f"not reachable: best achieved {v['achieved']:.3f} "
                                          f"(max_layer_ratio {max_layer_ratio}); kept the best"})


def _forward(model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example)
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"structured_prune needs a model returning one tensor, got "
                         f"{type(out).__name__}")
    return out


def _verify(model: nn.Module, example: tuple[torch.Tensor, ...],
            shape: torch.Size) -> None:
    """Forward pass, NaN/Inf check, output shape unchanged."""
    try:
        out = _forward(model, example)
    except Exception as exc:
        where = module_in_traceback(model, exc)
        name = where.split(" ")[0]
        raise ModelError(f"the pruned model fails in module '{where}' on the example inputs "
                         f"({type(exc).__name__}: {str(exc)[:200]}); it probably hard-codes a "
                         f"channel count: leave it alone with exclude: ['{name}']") from exc
    if out.shape != shape:
        raise ModelError(f"pruning changed the output shape {tuple(shape)} -> "
                         f"{tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ModelError("the pruned model produced NaN/Inf on the example inputs")


def _layer_sizes(before: nn.Module, after: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Per resized module: its (out, in) channel counts before and after."""
    old = dict(before.named_modules())
    out = {}
    for name, m in after.named_modules():
        w = getattr(m, "weight", None)
        ow = getattr(old.get(name), "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(ow, torch.Tensor) and w.shape != ow.shape:
            out[name] = {"before": list(ow.shape[:2]), "after": list(w.shape[:2])}
    return out


@register_stage(StructuredPruneConfig)
def structured_prune(model: SlimModel, cfg: StructuredPruneConfig,
                     ctx: StageContext) -> tuple[SlimModel, Record]:
    """Remove whole channels/heads/blocks from a copy of ``model`` (see :func:`_prune_module`).
    """
    module, record = _prune_module(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                                       progress=ctx.progress, checkpoint_dir=ctx.workdir,
                                       example_inputs=model.example_inputs(2))
    # The architecture changed: the artifact rebuilds it by replaying each plan.
    record.transforms += [("structured_prune", p) for p in record.details["plans"]
                          if changes_structure(p)]
    return model.copy(module), record
