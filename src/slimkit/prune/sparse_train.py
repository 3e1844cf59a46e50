"""Sparse training from the start, RigL style (Evci et al. 2020, "Rigging the Lottery").

The model trains at a fixed sparsity throughout. Layer densities follow Erdős-Rényi-Kernel
(ERK: density proportional to ``sum(shape) / prod(shape)``, so small layers stay denser) or are
uniform. Every ``update_every`` steps, until ``end_fraction`` of training, each layer drops
the fraction ``alpha_t = alpha / 2 * (1 + cos(pi t / T_end))`` of its active weights with the
smallest magnitude and regrows as many inactive weights where the dense gradient is largest;
regrown weights start at zero, so the layer's number of active weights never changes.

The dense gradient comes from the same backward pass as the training step: a hook keeps it
and hands the optimizer the masked one, so inactive weights get no update (see
:class:`slimkit.prune.magnitude.MaskedWeights`). Training runs in the shared loop
(``slimkit.distill.run.finetune``), from a trained or a freshly initialized model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

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
from slimkit.prune.config import SparseTrainConfig
from slimkit.prune.magnitude import MaskedWeights
from slimkit.prune.schedule import magnitude_masks, total_steps


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities whose weighted mean is ``density``, ERK-shaped (Evci et al. 2020).

    ``d_l = eps * sum(shape_l) / prod(shape_l)``, with ``eps`` solved so the kept weights add
    up; a layer whose ``d_l`` would exceed 1 is made dense and ``eps`` solved again.

    Example:
        >>> d = erk_densities({"a": (100, 10), "b": (10, 100)}, 0.2)
        >>> round(d["a"], 3), round(d["b"], 3)
        (0.2, 0.2)
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = target - sum(numel[n] for n in dense)
        scale = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / scale if scale > 0 else 0.0
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= over


def drop_fraction_at(step: int, alpha: float, end: int) -> float:
    """Cosine-decayed fraction of active weights exchanged at ``step`` (0 at ``end``)."""
    return 0.5 * alpha * (1.0 + math.cos(math.pi * min(step, end) / max(1, end)))


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor,
                  fraction: float) -> tuple[torch.Tensor, int]:
    """One RigL update of one layer's mask; the weight's regrown entries are set to zero.

    Drops the ``k = floor(fraction * active)`` active weights of smallest magnitude, then
    grows the ``k`` positions inactive after the drop with the largest ``|grad|``.

    Returns:
        ``(new mask, k)``.
    """
    flat_mask = mask.flatten()
    active = int(flat_mask.sum())
    k = min(int(fraction * active), flat_mask.numel() - active)
    if k <= 0:
        return mask, 0
    score = torch.where(flat_mask, weight.detach().abs().flatten(),
                        torch.full_like(flat_mask, float("inf"), dtype=weight.dtype))
    drop = torch.sort(score, stable=True).indices[:k]
    kept = flat_mask.clone()
    kept[drop] = False
    grow_score = torch.where(kept, torch.full_like(score, -1.0), grad.detach().abs().flatten())
    grow = torch.sort(grow_score, descending=True, stable=True).indices[:k]
    new = kept.clone()
    new[grow] = True
    with torch.no_grad():
        weight.view(-1)[grow] = 0.0  # regrown connections start at zero
    return new.view_as(mask), k


def _update_masks(held: MaskedWeights, fraction: float) -> int:
    """One RigL update of every held layer from its stored dense gradient; weights moved."""
    moved = 0
    for name, module in held.modules.items():
        held.masks[name], k = drop_and_grow(module.weight, held.masks[name],
                                            held.dense_grad[name], fraction)
        moved += k
    return moved


def _sparse_train(model: nn.Module, cfg: SparseTrainConfig, data: DataBundle | None,
                  teacher: nn.Module | None = None, progress: bool = False,
                  checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, Record]:
    """Train a copy of ``model`` sparse from the start, exchanging weights RigL-style.

    Args:
        model: trained or freshly initialized; left untouched. The initial mask keeps each
            layer's largest magnitudes (for a fresh init that is a random mask).
        cfg: sparsity, distribution, update schedule, selectors and training config.
        data: the training data.
        teacher: for ``train.distill``; defaults to ``model``.

    Returns:
        The trained sparse copy and a Record: per-layer density, the updates made (step,
        fraction, weights exchanged), the training history.

    Raises:
        ConfigError: no data or no layer selected.

    Example:
        >>> net2, rec = sparse_train(net, SparseTrainConfig(sparsity=0.9), data)  # doctest: +SKIP
    """
    if data is None:
        raise ConfigError("sparse_train: needs training data (give --data)")
    teacher = model if teacher is None else teacher
    model = copy.deepcopy(model)
    layers, skipped = select_layers(model, cfg.layer_types, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(f"sparse_train: no layer of types {cfg.layer_types} after "
                          "include/exclude")
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    densities = (erk_densities(shapes, 1.0 - cfg.sparsity) if cfg.distribution == "erk"
                 else dict.fromkeys(shapes, 1.0 - cfg.sparsity))
    weights = {n: m.weight.detach() for n, m in layers.items()}
    held = MaskedWeights(layers, magnitude_masks(weights, {n: 1 - d for n, d in
                                                           densities.items()}))
    held.apply()
    end = int(cfg.end_fraction * total_steps(cfg.train, data.n_train))
    updates: list[dict[str, Any]] = []
    state = {"step": 0}

    def after_step(_: nn.Module) -> None:
        state["step"] += 1
        t = state["step"]
        if t % cfg.update_every == 0 and t < end and len(held.dense_grad) == len(layers):
            fraction = drop_fraction_at(t, cfg.drop_fraction, end)
            updates.append({"step": t, "fraction": fraction,
                            "exchanged": _update_masks(held, fraction)})
        held.apply()

    held.attach()
    try:
        history = finetune(model, data, cfg.train, teacher=teacher, after_step=after_step,
                           progress=progress, label="sparse train", checkpoint_dir=checkpoint_dir)
    finally:
        held.detach()
    record = Record(skipped=skipped, details={"updates": updates, "finetune": history,
                                              "target_density": densities})
    per_layer = {}
    for name, mask in held.masks.items():
        per_layer[name] = {"density": float(mask.float().mean()), "numel": mask.numel(),
                           "active": int(mask.sum())}
        record.changed.append(f"{name}: trained at {per_layer[name]['density']:.1%} density")
    record.details["layers"] = per_layer
    return model, record


@register_stage(SparseTrainConfig)
def sparse_train(model: SlimModel, cfg: SparseTrainConfig,
                 ctx: StageContext) -> tuple[SlimModel, Record]:
    """Train a copy of ``model`` sparse from the start, RigL-style (see :func:`_sparse_train`).

    Hugging Face Conv1D layers count as Linear: they are converted first (same math,
    recorded, replayed when an artifact loads; see :func:`slimkit.io.linear.prepare_layers`).
    A tied layer (an LM head sharing its embedding's matrix) is left dense unless named
    exactly in ``include``: pruning it prunes the embedding too, and the record says so.
    """
    model, cfg, prep = prepare_layers(model, cfg, "sparse_train",
                                      convert="Linear" in cfg.layer_types, in_place="pruned")
    module, record = _sparse_train(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                                   progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), prep.finish(record)
