"""N:M semi-structured sparsity (default 2:4): in every group of M consecutive weights along
the input dimension, keep the N largest magnitudes.

Groups run along what a GEMM reduces over, as NVIDIA's sparse tensor cores (and ASP) expect:
a Linear layer's ``in_features``; a convolution's input channels, at each output channel and
kernel position. A layer whose input width is not a multiple of M is skipped, with the reason
recorded (it is never padded). The pattern halves the multiply-adds only on hardware with
sparse tensor cores (Ampere and later GPUs, via cuSPARSELt / TensorRT); ONNX Runtime on a CPU
runs a 2:4-sparse model at dense speed, and the zeros are stored densely unless the model is
packed (``encode``) afterwards.
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
from slimkit.prune.config import NMPruneConfig
from slimkit.prune.magnitude import MaskedWeights, sparsity

SPEED_NOTE = ("N:M sparsity speeds up matrix multiplies only on GPUs with sparse tensor cores "
              "(NVIDIA Ampere+, cuSPARSELt/TensorRT); ONNX Runtime on CPU runs it at dense "
              "speed, and the file shrinks only when the model is packed (encode stage).")


def _grouped(w: torch.Tensor, m: int) -> torch.Tensor:
    """View of ``w`` as ``(-1, m)`` groups along the input dimension (dim 1)."""
    # Move the input dimension last: Linear (out, in); Conv (out, in, *k) -> (out, *k, in).
    moved = w.movedim(1, -1) if w.dim() > 2 else w
    return moved.reshape(-1, m)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest magnitudes of each group of ``m`` input weights.

    Ties go to the earlier position in the group (stable sort), so the mask is deterministic.

    Args:
        weight: a Linear ``(out, in)`` or convolution ``(out, in, *kernel)`` weight with
            ``in % m == 0``.

    Returns:
        Bool tensor shaped like ``weight``.

    Raises:
        ValueError: the input dimension is not a multiple of ``m``.

    Example:
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), 2, 4).tolist()
        [[False, True, True, False]]
    """
    if weight.dim() < 2 or weight.shape[1] % m:
        raise ValueError(f"input dimension {tuple(weight.shape)[1:2]} is not a multiple of {m}")
    groups = _grouped(weight.detach().abs(), m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    if weight.dim() > 2:
        moved_shape = weight.movedim(1, -1).shape
        return keep.reshape(moved_shape).movedim(-1, 1).contiguous()
    return keep.reshape(weight.shape)


def plan_nm(model: nn.Module, cfg: NMPruneConfig) -> tuple[dict, list[dict]]:
    """The plan ``{"n", "m", "layers": [names]}`` and the skipped layers (with reasons).

    Raises:
        ConfigError: no layer of ``cfg.layer_types`` is selected.
    """
    layers, skipped = select_layers(model, cfg.layer_types, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(f"nm_prune: no layer of types {cfg.layer_types} to prune after "
                          "include/exclude")
    chosen = []
    for name, module in layers.items():
        width = module.weight.shape[1] if module.weight.dim() >= 2 else 0
        if width % cfg.m or width == 0:
            skipped.append({"what": name, "why": f"input width {width} is not a multiple of "
                                                 f"m={cfg.m} (not padded)"})
        else:
            chosen.append(name)
    return {"n": cfg.n, "m": cfg.m, "layers": chosen}, skipped


def _nm_prune(model: nn.Module, cfg: NMPruneConfig, data: DataBundle | None = None,
              teacher: nn.Module | None = None, progress: bool = False,
              checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, Record]:
    """Apply N:M sparsity to a copy of ``model``; optionally fine-tune with the masks fixed.

    Args:
        model: any module with Linear/Conv layers; left untouched.
        cfg: N, M, selectors and optional fine-tuning.
        data: needed only when ``cfg.finetune`` is set.
        teacher: for ``finetune.distill``; defaults to the unpruned ``model``.

    Returns:
        The pruned copy and a Record (plan, per-layer sparsity, skipped layers with reasons,
        and the note that CPU runtimes gain no speed from the pattern).

    Raises:
        ConfigError: fine-tuning without data, or no layer selected.

    Example:
        >>> pruned, rec = nm_prune(net, NMPruneConfig())  # doctest: +SKIP
    """
    if cfg.finetune is not None and data is None:
        raise ConfigError("nm_prune: finetune needs data (give --data)")
    teacher = model if teacher is None else teacher
    model = copy.deepcopy(model)
    plan, skipped = plan_nm(model, cfg)
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in plan["layers"]}
    held = MaskedWeights(layers, {n: nm_mask(m.weight, cfg.n, cfg.m) for n, m in layers.items()})
    held.apply()
    record = Record(skipped=skipped, details={"plan": plan, "speed_note": SPEED_NOTE})
    if cfg.finetune is not None and cfg.finetune.epochs > 0 and layers:
        held.attach()
        try:
            record.details["finetune"] = finetune(
                model, data, cfg.finetune, teacher=teacher, after_step=lambda _: held.apply(),
                progress=progress, label=f"{cfg.n}:{cfg.m} fine-tune",
                checkpoint_dir=checkpoint_dir)
        finally:
            held.detach()
    per_layer = {}
    for name, module in layers.items():
        per_layer[name] = {"sparsity": sparsity(module.weight), "numel": module.weight.numel()}
        record.changed.append(f"{name}: {cfg.n}:{cfg.m} sparse "
                              f"({per_layer[name]['sparsity']:.1%} zeros)")
    record.details["layers"] = per_layer
    return model, record


@register_stage(NMPruneConfig)
def nm_prune(model: SlimModel, cfg: NMPruneConfig,
             ctx: StageContext) -> tuple[SlimModel, Record]:
    """Apply N:M sparsity to a copy of ``model`` (see :func:`_nm_prune`).

    Hugging Face Conv1D layers count as Linear: they are converted first (same math,
    recorded; see :func:`slimkit.io.linear.prepare_layers`). A layer whose weight another
    module also holds (a tied LM head and its embedding) is left dense, with the reason: the
    matrix is one tensor, so pruning the head would prune the embedding too. Named exactly in
    ``include`` it is pruned anyway, and the record says the other holder is pruned with it.
    """
    model, cfg, prep = prepare_layers(model, cfg, "nm_prune",
                                      convert="Linear" in cfg.layer_types, in_place="pruned")
    module, record = _nm_prune(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                               progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), prep.finish(record)
