"""Unstructured magnitude pruning, layer-wise or global, with optional masked fine-tuning.

Plan, then apply: the plan is the number of weights to zero in each layer (JSON), computed
from magnitudes; applying it zeroes the smallest-magnitude weights of each layer. Replaying a
saved plan on a fresh copy of the model gives the same result.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.distill.run import finetune
from slimkit.graph.select import select_layers
from slimkit.io.linear import prepare_layers
from slimkit.io.model import SlimModel
from slimkit.prune.config import MagnitudePruneConfig


def plan_magnitude(model: nn.Module, cfg: MagnitudePruneConfig) -> tuple[dict, list[dict]]:
    """Compute the plan ``{"layers": {name: n_zero}}`` and the skipped layers."""
    layers, skipped = select_layers(model, cfg.layer_types, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(f"magnitude_prune: no layer of types {cfg.layer_types} to prune "
                          "after include/exclude")
    weights = {n: m.weight.detach() for n, m in layers.items()}
    if cfg.scope == "layer":
        counts = {n: int(round(cfg.sparsity * w.numel())) for n, w in weights.items()}
    else:
        # Global: the k smallest magnitudes across all layers; count how many fall in each.
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        k = int(round(cfg.sparsity * flat.numel()))
        owner = torch.cat([torch.full((w.numel(),), i) for i, w in enumerate(weights.values())])
        order = torch.sort(flat, stable=True).indices[:k]
        per = torch.bincount(owner[order], minlength=len(weights))
        counts = {n: int(c) for n, c in zip(weights, per.tolist(), strict=True)}
    return {"layers": counts}, skipped


def apply_plan(model: nn.Module, plan: dict) -> dict[str, torch.Tensor]:
    """Zero the planned number of smallest-magnitude weights per layer; return the masks."""
    modules = dict(model.named_modules())
    masks = {}
    with torch.no_grad():
        for name, n_zero in plan["layers"].items():
            w = modules[name].weight
            mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            mask[torch.sort(w.abs().flatten(), stable=True).indices[:n_zero]] = False
            mask = mask.view_as(w)
            w.mul_(mask)
            masks[name] = mask
    return masks


def _magnitude_prune(model: nn.Module, cfg: MagnitudePruneConfig,
                     data: DataBundle | None = None, teacher: nn.Module | None = None,
                     progress: bool = False, checkpoint_dir: str | Path | None = None,
                     ) -> tuple[nn.Module, Record]:
    """Prune a copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: any module with Linear/Conv layers.
        cfg: the pruning config.
        data: needed only when ``cfg.finetune`` is set.
        teacher: for ``finetune.distill``; defaults to the unpruned ``model``.
        checkpoint_dir: where fine-tuning checkpoints go (``finetune.checkpoint_every``).

    Returns:
        The pruned copy and a Record (per-layer sparsity before/after, plan, skipped layers).

    Example:
        >>> pruned, rec = magnitude_prune(net, MagnitudePruneConfig(sparsity=0.9))
    """
    if cfg.finetune is not None and data is None:
        raise ConfigError("magnitude_prune: finetune needs data (give --data)")
    teacher = model if teacher is None else teacher
    model = copy.deepcopy(model)
    plan, skipped = plan_magnitude(model, cfg)
    modules = dict(model.named_modules())
    before = {n: _sparsity(modules[n].weight) for n in plan["layers"]}
    masks = apply_plan(model, plan)
    record = Record(skipped=skipped, details={"plan": plan})
    if cfg.finetune is not None and cfg.finetune.epochs > 0:

        def reapply(m: nn.Module) -> None:
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask)

        record.details["finetune"] = finetune(model, data, cfg.finetune, teacher=teacher,
                                              after_step=reapply, progress=progress,
                                              checkpoint_dir=checkpoint_dir)
    layers = {}
    for name in plan["layers"]:
        after = _sparsity(modules[name].weight)
        layers[name] = {"sparsity_before": before[name], "sparsity_after": after,
                        "numel": modules[name].weight.numel()}
        record.changed.append(f"{name}: {before[name]:.1%} -> {after:.1%} zeros")
    record.details["layers"] = layers
    return model, record


def _sparsity(w: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(w)) / w.numel()


class MaskedWeights:
    """Binary masks held on layer weights while the shared training loop runs.

    :meth:`attach` registers a gradient hook per weight that keeps the dense gradient (for
    criteria that need it, such as RigL's regrowth) in :attr:`dense_grad` and hands the
    optimizer the masked gradient, so a pruned weight gets no gradient and no optimizer
    momentum; :meth:`apply` (called after every optimizer step) zeroes the pruned weights
    again, which undoes weight decay or leftover momentum. Masks may be replaced between
    steps (schedules, regrowth): assign to ``masks[name]`` and call :meth:`apply`.

    Args:
        modules: ``{name: module}`` with a ``weight`` parameter each.
        masks: ``{name: bool tensor shaped like the weight}``, True = kept.

    Example:
        >>> held = MaskedWeights(layers, masks)  # doctest: +SKIP
        >>> held.attach()  # doctest: +SKIP
        >>> fit(model, data, cfg, after_step=lambda m: held.apply())  # doctest: +SKIP
        >>> held.detach()  # doctest: +SKIP
    """

    def __init__(self, modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
        self.modules = modules
        self.masks = masks
        self.dense_grad: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> None:
        """Register the gradient hooks (idempotent)."""
        self.detach()
        for name, module in self.modules.items():
            self._handles.append(module.weight.register_hook(self._hook(name)))

    def _hook(self, name: str):  # noqa: ANN202
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.dense_grad[name] = grad.detach()
            return grad * self.masks[name].to(grad.dtype)
        return hook

    def detach(self) -> None:
        """Remove the gradient hooks and forget the stored gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.dense_grad = {}

    def apply(self) -> None:
        """Zero every pruned weight (in place)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.modules[name].weight.mul_(mask)

    def density(self) -> dict[str, float]:
        """Kept fraction of each mask."""
        return {n: float(m.float().mean()) for n, m in self.masks.items()}


def sparsity(w: torch.Tensor) -> float:
    """Fraction of exact zeros in ``w``."""
    return _sparsity(w)


@register_stage(MagnitudePruneConfig)
def magnitude_prune(model: SlimModel, cfg: MagnitudePruneConfig,
                    ctx: StageContext) -> tuple[SlimModel, Record]:
    """Zero the smallest-magnitude weights of a copy of ``model`` (optionally fine-tune).

    ``ctx.data`` is needed only for ``cfg.finetune``; details in :func:`_magnitude_prune`.

    Example:
        >>> pruned, rec = magnitude_prune(slimkit.wrap(net, x), MagnitudePruneConfig(sparsity=0.9))

    Hugging Face Conv1D layers count as Linear: they are converted first (same math,
    recorded; see :func:`slimkit.io.linear.prepare_layers`). A layer whose weight another
    module also holds (a tied LM head and its embedding) is left dense, with the reason: the
    matrix is one tensor, so pruning the head would prune the embedding too. Named exactly in
    ``include`` it is pruned anyway, and the record says the other holder is pruned with it.
    """
    model, cfg, prep = prepare_layers(model, cfg, "magnitude_prune",
                                      convert="Linear" in cfg.layer_types, in_place="pruned")
    module, record = _magnitude_prune(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                                      progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), prep.finish(record)
