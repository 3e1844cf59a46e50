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
    ``1/sqrt(original head size)``), ``hf_loadable`` (``auto``/true/false: inside a
    transformers model prune only what its config can say, so ``save_pretrained`` output
    reloads with ``from_pretrained``).
``structured_prune(model, cfg, ctx) -> (pruned SlimModel, Record)``: the whole technique, as a
    stage (:mod:`slimkit.core.stages`); the input model is never modified.
``plan_structured(model, cfg, data=None, example_inputs=None) -> plan``: JSON plan (per group
    the kept channel indices; per tensor the kept indices along each dim; head counts, head
    sizes, query scale factors).
``apply_structured(model, plan) -> new model``: slices a copy by the plan (no graph needed, so
    a saved plan replays on a freshly built model; the artifact rebuilder does exactly that).
``slimkit.graph.dependency.analyze(model, example_inputs)``: what can and cannot be pruned,
    and why, before any work starts.

How it works: :mod:`slimkit.graph.dependency` captures the model with ``torch.export`` and
groups coupled channels (conv -> BN -> next conv, residual adds, concat, split/chunk,
flatten -> Linear, depthwise and grouped convs, attention heads, GPT-2's fused q/k/v
``Conv1D``, embeddings and the LM head tied to them); a criterion scores
each group's channels over all of its parameters; an allocator decides how many to keep; the
slicer builds new, smaller ``nn.Parameter`` s and updates ``in_channels``/``out_features``/
``num_features``/``normalized_shape``/``groups``/head counts/head sizes. Nothing is masked.
``nn.MultiheadAttention`` modules are first swapped, on the copy, for the equivalent
:class:`~slimkit.prune.unfuse.UnfusedMultiheadAttention` (q/k/v/out ``nn.Linear``), so that their
heads and head dims can be pruned; the plan lists them (``unfused_mha``) and replays the swap
first. Those it cannot represent (``add_bias_kv``, ``add_zero_attn``) or that are excluded stay
fused with their sizes, and are listed in ``skipped``.
A Hugging Face model's ``config`` is updated to the pruned sizes where it can describe them
(:func:`slimkit.prune.hf_config.sync_hf_config`); what it cannot describe is in ``skipped``.
With ``hf_loadable`` (default ``auto``: on for transformers models whose config can say a
pruned width, as BERT, GPT-2 and ViT) only such widths are pruned, one count per config key
(every layer's FFN width; whole heads where the config keeps the head size), so that
``save_pretrained`` output reloads with ``from_pretrained``; the hidden size, heads the config
cannot count, and residual branches stay, each with the reason
(:mod:`slimkit.prune.hf_loadable`). ``ratio`` is then the share of those channels.

This module holds the one orchestration (:func:`_orchestrate`: plan -> apply -> fine-tune, per
step) that both :func:`plan_structured` and the stage run; the parts live beside it:
``structured_config`` (the config), ``structured_plan`` (selection, scoring, plans, replay),
``structured_target`` (targets and the width step), ``structured_depth`` (``blocks``),
``structured_record`` (the Record).

Example:
    >>> cfg = StructuredPruneConfig(ratio=0.5, criterion="l2", round_to=8)
    >>> small, record = structured_prune(slimkit.wrap(model, torch.randn(1, 3, 32, 32)), cfg)
    >>> record.details["params"]        # {"before": ..., "after": ...}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.distill.run import finetune
from slimkit.io import batch as B
from slimkit.io.model import SlimModel, modes_kept
from slimkit.prune.slimming import slimming_train
from slimkit.prune.structured_config import TARGET_KEYS, StructuredPruneConfig
from slimkit.prune.structured_depth import Depth, prune_depth
from slimkit.prune.structured_plan import (
    PLAN_FORMAT,
    Job,
    apply_structured,
    build_plan,
    changes_structure,
    pruned_failure,
    replay_plan,
    score_groups,
    select,
    unfused_copy,
    with_unfused,
)
from slimkit.prune.structured_record import (
    base_record,
    record_depth,
    record_target,
    record_unfused,
    sync_configs,
    target_summary,
)
from slimkit.prune.structured_target import Target, make_target, width_step


@dataclass(frozen=True)
class _Training:
    """What a run adds to planning: Network Slimming first, fine-tuning after every step."""

    teacher: nn.Module
    progress: bool
    checkpoint_dir: str | Path | None


@dataclass
class _Pruned:
    """What the orchestration produced.

    Attributes:
        base: the copy that was pruned, before pruning (``nn.MultiheadAttention`` unfused):
            what the target and the record measure against.
        model: the pruned model.
        raw_plans: each step's plan, before the attention swap and branches are added.
        found: each step's target search record (target mode).
    """

    base: nn.Module
    model: nn.Module
    unfused: list[str]
    unfuse_skipped: list[dict[str, str]]
    target: Target | None
    depth: Depth | None
    slimmed: dict[str, Any] | None = None
    raw_plans: list[dict[str, Any]] = field(default_factory=list)
    found: list[dict[str, Any]] = field(default_factory=list)
    tuned: list[dict[str, Any]] = field(default_factory=list)

    def plan(self, i: int, **extra: Any) -> dict[str, Any]:
        """Step ``i``'s replayable plan: attention swap, branches (first step), slices."""
        blocks = self.depth.blocks if self.depth is not None and i == 0 else []
        return with_unfused({**self.raw_plans[i], **extra, "blocks": blocks}, self.unfused,
                            self.unfuse_skipped)


def _orchestrate(model: nn.Module, cfg: StructuredPruneConfig, data: DataBundle | None,
                 example: B.Inputs, ratio: float | None = None,
                 training: _Training | None = None) -> _Pruned:
    """Structured pruning, the one way: plan -> apply (-> fine-tune), step by step.

    On a copy of ``model``: swap ``nn.MultiheadAttention`` for its unfused equivalent, take
    the target's measurements, (slim,) remove residual blocks, then prune channels in
    ``cfg.steps`` steps toward the ratio or target (fine-tuning after each). Without
    ``training`` this is :func:`plan_structured`: one step to the ratio (``ratio`` overrides
    ``cfg.ratio`` and turns the target off) or to the target as asked, no training.
    """
    # include/exclude are resolved once per model and passed along: on the user's model
    # (which attention stays fused), and on the unfused copy, whose new q/k/v/out Linears
    # they may name (blocks and every step then use that one resolution).
    selection = select(model, cfg)
    work, unfused, unfuse_skipped = unfused_copy(model, selection)
    job = Job(cfg, data, example, selection if work is model else select(work, cfg))
    target = make_target(cfg, example, work) if ratio is None else None
    out = _Pruned(work, work, unfused, unfuse_skipped, target, None)
    current = work
    if training is not None and cfg.slimming is not None:
        current = copy.deepcopy(model) if work is model else work
        out.slimmed = slimming_train(current, cfg.slimming, data, training.progress)
    if cfg.blocks:
        out.depth = prune_depth(current, job, target)
        current = out.depth.model
    steps = 1 if training is None else cfg.steps
    for s in range(1, steps + 1):
        if out.depth is not None and out.depth.step is not None and steps == 1:
            current, plan, found = out.depth.step  # blocks: auto took this step already
        else:
            current, plan, found = width_step(current, job, *_goal(cfg, ratio, target, s, steps,
                                                                   training is not None))
        out.raw_plans.append(plan)
        if found is not None:
            out.found.append(found)
        if training is not None and cfg.finetune is not None and cfg.finetune.epochs > 0:
            out.tuned.append(finetune(current, data, cfg.finetune, teacher=training.teacher,
                                      progress=training.progress,
                                      checkpoint_dir=training.checkpoint_dir,
                                      label=f"structured fine-tune {s}"))
    out.model = current
    return out


def _goal(cfg: StructuredPruneConfig, ratio: float | None, target: Target | None, s: int,
          steps: int, scheduled: bool) -> tuple[float | None, Target | None]:
    """Step ``s``'s ratio (of the channels left) or target.

    Each step removes an equal share of the original channels, or lowers every asked share
    by an equal amount; a plan (not ``scheduled``) asks for the target itself.
    """
    if target is None:
        r = cfg.ratio if ratio is None else ratio
        done = r * (s - 1) / steps  # share of the original channels removed
        return (r / steps) / (1.0 - done), None
    return None, target.at_step(s, steps) if scheduled else target


def plan_structured(model: nn.Module, cfg: StructuredPruneConfig,
                    data: DataBundle | None = None,
                    example_inputs: B.Inputs | None = None,
                    ratio: float | None = None) -> dict[str, Any]:
    """Plan which channels to keep, for ``cfg.ratio``, ``cfg.target`` or the given ``ratio``.

    The planning part of :func:`structured_prune` (one step, no training).

    Args:
        model: the model (not modified).
        cfg: the config; with ``cfg.target`` the ratio is searched by measuring pruned copies
            and the plan gets a ``target`` entry (ratio, achieved, asked, reached). ``steps``,
            ``slimming`` and ``finetune`` are ignored here (see :func:`structured_prune`).
        data: calibration data (needed by ``taylor``).
        example_inputs: inputs to trace with, as the model takes them (a tuple of positional
            inputs, ``(x,)``, or a dict of keyword ones; default: two training samples of
            ``data``).
        ratio: overrides ``cfg.ratio``.

    Returns:
        ``{"format", "version", "groups": [{"id", "root", "size", "keep", "heads",
        "head_dims"}], "slices": {tensor: {dim: kept indices}}, "heads": {module: count},
        "head_dims": {module: head size}, "scale": {query tensor: factor}, "skipped",
        "unfused_mha": [attention modules swapped for UnfusedMultiheadAttention first],
        "blocks": [residual branches removed before slicing (module, add, nodes, score)],
        "hf_loadable": [transformers models pruned within their config (module names)],
        only when there are any}``.

    Raises:
        ConfigError: unknown layer names in include/exclude (naming the closest), taylor
            without data, ``ratio`` with ``blocks: auto``.
        ModelError: the model cannot be captured, or a pruned candidate fails (naming the
            module to exclude).

    Example:
        >>> plan = plan_structured(net, StructuredPruneConfig(ratio=0.3), example_inputs=(x,))
        >>> small = apply_structured(net, plan)
    """
    if ratio is not None and cfg.blocks == "auto":
        raise ConfigError("plan_structured: blocks 'auto' searches toward cfg.target; it "
                          "cannot be combined with a fixed ratio (give blocks as a share)")
    pruned = _orchestrate(model, cfg, data, _example(data, example_inputs), ratio)
    if not pruned.found:
        return pruned.plan(0)
    return pruned.plan(0, target=target_summary(pruned.found[0], pruned.found))


@register_stage(StructuredPruneConfig)
def structured_prune(model: SlimModel, cfg: StructuredPruneConfig,
                     ctx: StageContext) -> tuple[SlimModel, Record]:
    """Remove whole channels/heads/conv groups/blocks from a copy of ``model``; verify it.

    Args:
        model: any ``torch.export``-able module, wrapped (left untouched), with any inputs
            (a tensor, a tuple, a dict) and outputs (a tensor, a tuple, a dict, a
            ``ModelOutput``); its example inputs (batch 2) trace and verify. Channels reaching
            any output keep their sizes.
        cfg: the config (ratio or target, criterion, allocation, rounding, selection...).
        ctx: ``data`` for ``taylor``, block scores and ``finetune``; ``teacher`` for
            ``finetune.distill`` (default: the unpruned model); ``progress``; ``workdir``
            for fine-tuning checkpoints.

    Returns:
        The pruned copy and a Record: ``changed`` one line per resized layer (and per updated
        Hugging Face config key); ``skipped`` the groups left alone and why (and the config
        keys that cannot express per-layer sizes); ``details``: ``layers`` (per
        Conv/Linear/norm channels before/after), ``params``/``flops`` before/after,
        ``unsupported_ops`` (ops without a channel rule, by module; their channels were left
        alone), ``plans`` (one per step, replayable with :func:`apply_structured`),
        ``target`` (asked, achieved, reached) in target mode, ``finetune`` (one training
        summary per step) when fine-tuning, ``hf_config`` (per transformers model inside:
        whether its synced config rebuilds the pruned sizes, as ``from_pretrained`` needs).
        ``transforms``: the plans that change the architecture, which the artifact replays.

    Raises:
        ConfigError: bad selectors (naming the closest layer), taylor or finetune without data.
        ModelError: the model cannot be captured, or the pruned model fails / gives NaN/Inf /
            changes an output's shape on the example inputs (naming the reason).

    Example:
        >>> small, rec = structured_prune(model, StructuredPruneConfig(target={"flops": 0.5}))
        >>> rec.details["target"]["achieved"] <= 0.5
        True
    """
    module, example = model.module, _example(ctx.data, model.example_inputs(2))
    if cfg.finetune is not None and ctx.data is None:
        raise ConfigError("structured_prune: finetune needs data (give --data)")
    teacher = module if ctx.teacher_module is None else ctx.teacher_module
    with modes_kept(module):  # measuring switches modes; the user's model keeps its own
        shapes = _shapes(_forward(module, example))
        pruned = _orchestrate(module, cfg, ctx.data, example,
                              training=_Training(teacher, ctx.progress, ctx.workdir))
        result = copy.deepcopy(module) if pruned.model is module else pruned.model
        _verify(result, example, shapes)
        record = _record(module, result, example, pruned, cfg)
    # The architecture changed: the artifact rebuilds it by replaying each plan.
    record.transforms += [("structured_prune", p) for p in record.details["plans"]
                          if changes_structure(p)]
    return model.copy(result), record


def _record(original: nn.Module, result: nn.Module, example: B.Inputs,
            pruned: _Pruned, cfg: StructuredPruneConfig) -> Record:
    record = base_record(pruned.base, result, example,
                         [pruned.plan(i) for i in range(len(pruned.raw_plans))])
    record_unfused(record, pruned.unfused)
    if pruned.depth is not None:
        record_depth(record, pruned.depth)
    sync_configs(original, result, record)
    if pruned.tuned:
        record.details["finetune"] = pruned.tuned
    if pruned.slimmed is not None:
        record.details["slimming"] = pruned.slimmed
    if pruned.target is not None:
        record_target(record, result, pruned.target, pruned.found, cfg.max_layer_ratio)
    return record


def _example(data: DataBundle | None, example_inputs: B.Inputs | None) -> B.Inputs:
    """The batch to trace, measure and verify with: the given one, else two training samples
    (as the model takes them: one tensor in a tuple, or the data's tuple or dict)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, dict) else tuple(example_inputs)
    if data is not None:
        x = data.head("train", 2)[0]
        return x if isinstance(x, tuple | dict) else (x,)
    raise ConfigError("structured_prune needs example_inputs (or data) to trace the model")


def _forward(model: nn.Module, example: B.Inputs) -> dict[str, torch.Tensor]:
    """Every output tensor of one eval-mode pass, by name (:func:`slimkit.io.batch.flatten`)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = B.flatten(B.call(model, example))
    finally:
        model.train(was)
    if not out:
        raise ModelError("structured_prune needs a model that returns at least one tensor; "
                         f"{type(model).__name__} returned none")
    return out


def _shapes(outputs: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in outputs.items()}


def _verify(model: nn.Module, example: B.Inputs, shapes: dict[str, tuple[int, ...]]) -> None:
    """Forward pass, NaN/Inf check, every output's shape unchanged."""
    try:
        out = _forward(model, example)
    except Exception as exc:
        raise pruned_failure(model, exc) from exc
    got = _shapes(out)
    if got != shapes:
        if list(got) != list(shapes):
            raise ModelError(f"pruning changed the model's outputs {list(shapes)} -> "
                             f"{list(got)}")
        name = next(k for k in shapes if got[k] != shapes[k])
        which = "" if list(shapes) == ["output"] else f" of output '{name}'"
        raise ModelError(f"pruning changed the output shape{which} {shapes[name]} -> "
                         f"{got[name]}")
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        which = "" if list(out) == ["output"] else f" (output '{bad[0]}')"
        raise ModelError(f"the pruned model produced NaN/Inf on the example inputs{which}")


__all__ = ["PLAN_FORMAT", "TARGET_KEYS", "StructuredPruneConfig", "Target", "apply_structured",
           "build_plan", "changes_structure", "plan_structured", "replay_plan", "score_groups",
           "structured_prune"]
