"""Gradual magnitude pruning on a polynomial schedule (Zhu & Gupta 2017, "To prune, or not").

The sparsity rises from ``s_i`` to ``s_f`` in ``n`` pruning steps, ``Δt`` optimizer steps
apart, starting at step ``t0``, while the model fine-tunes through the shared training loop::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n Δt))^3      t = t0, t0 + Δt, ..., t0 + n Δt

It prunes fast while many redundant weights remain and slowly near the end, so fine-tuning
recovers between steps. At each pruning step the smallest-magnitude weights are masked (one
threshold across layers for ``scope=global``, the same ratio -- or each layer's own final
ratio from ``layer_sparsity`` -- for ``scope=layer``); between steps the masks are held fixed:
masked weights get no gradient and are zeroed again after every optimizer step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.distill.config import FinetuneConfig
from slimkit.distill.run import finetune
from slimkit.graph.select import select_layers
from slimkit.io.linear import prepare_layers
from slimkit.io.model import SlimModel
from slimkit.prune.config import GradualPruneConfig
from slimkit.prune.magnitude import MaskedWeights, sparsity


def agp_sparsity(step: int, s_i: float, s_f: float, t0: int, freq: int, n: int) -> float:
    """Target sparsity at optimizer ``step`` on the cubic schedule (constant outside it).

    Example:
        >>> round(agp_sparsity(50, 0.0, 0.8, 0, 10, 10), 4)  # half way: 0.8 * (1 - 0.5^3)
        0.7
    """
    if step <= t0:
        return s_i
    progress = min(1.0, (step - t0) / (n * freq))
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """Optimizer steps the shared loop will run for ``cfg`` on ``n_train`` samples."""
    return cfg.max_steps or math.ceil(n_train / cfg.batch_size) * cfg.epochs


def plan_schedule(cfg: GradualPruneConfig, steps: int) -> list[dict[str, float]]:
    """The pruning steps: ``[{"step", "target"}]`` from ``t0`` to ``t0 + nΔt``.

    Raises:
        ConfigError: the schedule does not fit in ``steps`` optimizer steps.
    """
    n = cfg.num_updates
    if n is None:
        n = max(1, int((cfg.ramp_fraction * steps - cfg.start_step) // cfg.frequency))
    end = cfg.start_step + n * cfg.frequency
    if end > steps:
        raise ConfigError(f"gradual_prune: the schedule ends at step {end} (start_step "
                          f"{cfg.start_step} + {n} x frequency {cfg.frequency}) but training "
                          f"runs {steps} steps; lower frequency/num_updates or train longer")
    return [{"step": cfg.start_step + k * cfg.frequency,
             "target": agp_sparsity(cfg.start_step + k * cfg.frequency, cfg.initial_sparsity,
                                    cfg.final_sparsity, cfg.start_step, cfg.frequency, n)}
            for k in range(n + 1)]


def layer_targets(cfg: GradualPruneConfig, names: list[str], fraction: float) -> dict[str, float]:
    """Each layer's sparsity when the schedule is ``fraction`` of the way from s_i to s_f."""
    unknown = [k for k in cfg.layer_sparsity if k not in names]
    if unknown:
        raise ConfigError(f"gradual_prune: layer_sparsity names unknown layer '{unknown[0]}'."
                          f"{did_you_mean(unknown[0], names)}")
    return {n: cfg.initial_sparsity + fraction * (cfg.layer_sparsity.get(n, cfg.final_sparsity)
                                                  - cfg.initial_sparsity) for n in names}


def magnitude_masks(weights: dict[str, torch.Tensor], targets: dict[str, float] | float,
                    ) -> dict[str, torch.Tensor]:
    """Masks keeping the largest magnitudes: per layer (dict of ratios) or global (a float).

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    if isinstance(targets, dict):
        counts = {n: int(round(targets[n] * w.numel())) for n, w in weights.items()}
    else:
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        owner = torch.cat([torch.full((w.numel(),), i) for i, w in enumerate(weights.values())])
        order = torch.sort(flat, stable=True).indices[:int(round(targets * flat.numel()))]
        per = torch.bincount(owner[order], minlength=len(weights)).tolist()
        counts = dict(zip(weights, per, strict=True))
    masks = {}
    for name, w in weights.items():
        mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        mask[torch.sort(w.abs().flatten(), stable=True).indices[:counts[name]]] = False
        masks[name] = mask.view_as(w)
    return masks


def _achieved(held: MaskedWeights) -> float:
    kept = sum(int(m.sum()) for m in held.masks.values())
    return 1.0 - kept / sum(m.numel() for m in held.masks.values())


class _Schedule:
    """Runs a planned schedule from the training loop's ``after_step`` hook.

    Counts optimizer steps, prunes at the planned ones (recomputing the masks from the current
    magnitudes) and re-applies the masks after every other step.
    """

    def __init__(self, cfg: GradualPruneConfig, layers: dict[str, nn.Module],
                 planned: list[dict[str, Any]]) -> None:
        self.cfg, self.layers, self.n = cfg, layers, len(planned) - 1
        self.numel = {name: m.weight.numel() for name, m in layers.items()}
        self.held = MaskedWeights(layers, {name: torch.ones_like(m.weight, dtype=torch.bool)
                                           for name, m in layers.items()})
        self.due = {p["step"] for p in planned}
        self.step = 0
        self.followed: list[dict[str, Any]] = []

    def overall(self, target: float) -> tuple[float, dict[str, float] | float]:
        """The model-wide target and what magnitude_masks takes (per-layer ratios or one)."""
        s_i, s_f = self.cfg.initial_sparsity, self.cfg.final_sparsity
        if self.cfg.scope == "global":
            return target, target
        fraction = 1.0 if s_f == s_i else (target - s_i) / (s_f - s_i)
        per = layer_targets(self.cfg, list(self.layers), fraction)
        return sum(per[n] * self.numel[n] for n in per) / sum(self.numel.values()), per

    def prune_at(self, step: int) -> None:
        cfg = self.cfg
        target, targets = self.overall(agp_sparsity(
            step, cfg.initial_sparsity, cfg.final_sparsity, cfg.start_step, cfg.frequency,
            self.n))
        weights = {name: m.weight.detach() for name, m in self.layers.items()}
        self.held.masks = magnitude_masks(weights, targets)
        self.held.apply()
        self.followed.append({"step": step, "target": target,
                              "achieved": _achieved(self.held)})

    def after_step(self, _: nn.Module) -> None:
        self.step += 1
        if self.step in self.due:
            self.prune_at(self.step)
        else:
            self.held.apply()


def _gradual_prune(model: nn.Module, cfg: GradualPruneConfig, data: DataBundle | None,
                   teacher: nn.Module | None = None, progress: bool = False,
                   checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, Record]:
    """Prune a copy of ``model`` on the AGP schedule while fine-tuning it.

    Resuming from a fine-tuning checkpoint is not supported: the schedule restarts.

    Args:
        model: any module with Linear/Conv layers; left untouched.
        cfg: schedule, scope, selectors and the fine-tuning config.
        data: the training data (required: the schedule runs inside fine-tuning).
        teacher: for ``train.distill``; defaults to the unpruned ``model``.
        checkpoint_dir: where fine-tuning checkpoints go.

    Returns:
        The pruned copy and a Record: the planned and followed schedule (step, target,
        achieved sparsity; scope=layer targets are the layers' weighted mean), per-layer
        sparsity, the fine-tuning history.

    Raises:
        ConfigError: no data, no layer to prune, or a schedule longer than the training.

    Example:
        >>> pruned, rec = gradual_prune(net, GradualPruneConfig(final_sparsity=0.9), data)
        ... # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("gradual_prune: needs training data (give --data); the schedule "
                          "runs inside fine-tuning")
    teacher = model if teacher is None else teacher
    model = copy.deepcopy(model)
    layers, skipped = select_layers(model, cfg.layer_types, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(f"gradual_prune: no layer of types {cfg.layer_types} to prune after "
                          "include/exclude")
    steps = total_steps(cfg.train, data.n_train)
    planned = plan_schedule(cfg, steps)
    before = {name: sparsity(m.weight) for name, m in layers.items()}
    schedule = _Schedule(cfg, layers, planned)
    for p in planned:
        p["target"] = schedule.overall(p["target"])[0]
    if 0 in schedule.due:
        schedule.prune_at(0)
    schedule.held.attach()
    try:
        history = finetune(model, data, cfg.train, teacher=teacher,
                           after_step=schedule.after_step, progress=progress,
                           label="gradual prune", checkpoint_dir=checkpoint_dir)
    finally:
        schedule.held.detach()
    record = Record(skipped=skipped, details={
        "schedule": {"planned": planned, "followed": schedule.followed,
                     "num_updates": schedule.n, "total_steps": steps,
                     "formula": "s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3"},
        "finetune": history, "sparsity": _achieved(schedule.held), "layers": {}})
    for name, m in layers.items():
        after = sparsity(m.weight)
        record.details["layers"][name] = {"sparsity_before": before[name],
                                          "sparsity_after": after, "numel": m.weight.numel()}
        record.changed.append(f"{name}: {before[name]:.1%} -> {after:.1%} zeros")
    return model, record


@register_stage(GradualPruneConfig)
def gradual_prune(model: SlimModel, cfg: GradualPruneConfig,
                  ctx: StageContext) -> tuple[SlimModel, Record]:
    """Prune a copy of ``model`` on the AGP schedule while fine-tuning it.

    See :func:`_gradual_prune`.

    Hugging Face Conv1D layers count as Linear: they are converted first (same math,
    recorded, replayed when an artifact loads; see :func:`slimkit.io.linear.prepare_layers`).
    A tied layer (an LM head sharing its embedding's matrix) is left dense unless named
    exactly in ``include``: pruning it prunes the embedding too, and the record says so.
    """
    model, cfg, prep = prepare_layers(model, cfg, "gradual_prune",
                                      convert="Linear" in cfg.layer_types, in_place="pruned")
    module, record = _gradual_prune(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                                    progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), prep.finish(record)
