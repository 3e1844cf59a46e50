"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

Transformer activations have a few channels with huge ranges, which ruin per-tensor activation
quantization, while weights are easy. For ``y = X W^T`` and per-input-channel scales ``s``,
``y = (X diag(s)^-1) (W diag(s))^T``. With ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``
(alpha 0.5 splits the difficulty evenly) the activation ranges flatten. ``diag(s)^-1`` is
folded into the op that produces ``X``, so the float model is unchanged:

- a LayerNorm whose output feeds only Linear inputs (pre-norm blocks: the q/k/v projections,
  the first MLP layer): its affine weight and bias are divided by ``s``;
- a Linear whose output reaches the Linear only through ReLU / LeakyReLU / Dropout / Identity
  modules, which commute with a positive per-channel scale (``relu(z / s) = relu(z) / s``):
  its weight rows and bias are divided by ``s``.

Any other input (the model input, a residual add, GELU, an attention matmul, a LayerNorm that
also feeds a residual in a post-norm block) has no per-channel weight to absorb the scale: the
Linear is reported as skipped with the reason, never silently left alone.

Plan, then apply: :func:`plan_smoothing` finds the groups (from :mod:`slimkit.graph.chains`),
:func:`channel_absmax` gathers statistics, :func:`smooth` folds the scales.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimkit.graph.chains import norm_consumers, output_links
from slimkit.io import batch as B
from slimkit.quant.calibrate import batches_of, hooked_passes

#: Modules that commute with a positive per-channel scale of the last (Linear) dimension.
_EQUIVARIANT = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity)
_WHY = "SmoothQuant: "


def channel_absmax(model: nn.Module, names: list[str], data: Any,
                   batch_size: int = 64, where: str = "output",
                   calls: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Running per-channel (last dim) max |x| of the named modules' outputs or first inputs
    (bounded memory).

    Args:
        where: ``"output"`` or ``"input"`` (the first positional argument).
        calls: if given, filled with how many times each module ran.
    """
    stats: dict[str, torch.Tensor] = {}
    counts = {} if calls is None else calls
    modules = dict(model.named_modules())

    def update(name: str, t: torch.Tensor) -> None:
        counts[name] = counts.get(name, 0) + 1
        amax = t.detach().abs().reshape(-1, t.shape[-1]).amax(0).double()
        stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

    if where == "input":
        handles = [modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: update(n, args[0])) for n in names]
    else:
        handles = [modules[n].register_forward_hook(
            lambda _m, _a, out, n=n: update(n, out)) for n in names]
    hooked_passes(model, handles, batches_of(data, batch_size))
    return stats


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                  eps: float = 1e-8) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max_k max|W_k[:, j]|^(1 - alpha)`` over all consumers ``k``."""
    w_absmax = torch.stack([w.detach().abs().double().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=eps) ** alpha / w_absmax.clamp(min=eps) ** (1 - alpha)
    return torch.where((act_absmax > eps) & (w_absmax > eps), s, torch.ones_like(s))


def _skip(names: Any, why: str) -> list[dict[str, str]]:
    return [{"what": n, "why": _WHY + why} for n in names]


def plan_smoothing(model: nn.Module, targets: set[str] | None = None,
                   ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Which Linear inputs can be smoothed, and into which module the scale folds.

    Args:
        model: the float model (not modified).
        targets: the Linear layers whose inputs matter (the ones to be quantized); all by
            default. Layers outside are neither smoothed nor reported.

    Returns:
        ``(groups, skipped)``: JSON-able groups ``{"source": module, "kind": "norm" |
        "linear", "consumers": [linears], "through": [modules]}``, and ``{"what", "why"}`` for
        every target Linear (and LayerNorm) that cannot be smoothed.
    """
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    targets = set(linears) if targets is None else set(targets) & set(linears)
    ordered = [n for n in linears if n in targets]
    norms = norm_consumers(model)
    if norms is None:
        return [], _skip(ordered, "the model could not be traced (torch.fx), so the op "
                         "feeding this Linear is unknown and no scale can be folded into it; "
                         "its input was not smoothed")
    groups, skipped, covered = [], [], set()
    for norm, consumers in norms.items():
        if not set(consumers) & targets:
            continue
        covered |= set(consumers)
        if not modules[norm].elementwise_affine:
            skipped += _skip([c for c in consumers if c in targets], f"its input comes from "
                             f"LayerNorm '{norm}', which has no affine weight to fold a scale "
                             "into; not smoothed")
            continue
        groups.append({"source": norm, "kind": "norm", "consumers": consumers, "through": []})
    for producer, link in (output_links(model, set(linears)) or {}).items():
        consumer = link["consumer"]
        if consumer in targets and consumer not in covered and all(
                isinstance(modules.get(t), _EQUIVARIANT) for t in link["through"]):
            covered.add(consumer)
            groups.append({"source": producer, "kind": "linear", "consumers": [consumer],
                           "through": link["through"]})
    skipped += _skip([n for n, m in modules.items() if isinstance(m, nn.LayerNorm)
                      and n not in norms], "its output also goes to ops other than Linear "
                     "inputs (a residual add in a post-norm block, a pooling, the model output)"
                     ": a scale folded into it would change them")
    skipped += _skip([n for n in ordered if n not in covered], "its input is neither a "
                     "LayerNorm's output feeding only Linears nor a Linear's output through "
                     "ReLU/Dropout/Identity modules (it is the model input, a residual sum, a "
                     "GELU, an attention product...): no per-channel weight to fold a scale "
                     "into; not smoothed")
    return groups, skipped


def _fold(model: nn.Module, group: dict[str, Any], s: torch.Tensor) -> None:
    """``source <- source / s`` (per output channel), ``consumers <- consumers * s`` (columns)."""
    src = model.get_submodule(group["source"])
    if group["kind"] == "norm":
        src.weight.copy_((src.weight.double() / s).to(src.weight.dtype))
    else:
        src.weight.copy_((src.weight.double() / s[:, None]).to(src.weight.dtype))
    if src.bias is not None:
        src.bias.copy_((src.bias.double() / s).to(src.bias.dtype))
    for name in group["consumers"]:
        m = model.get_submodule(name)
        m.weight.copy_((m.weight.double() * s).to(m.weight.dtype))


def smooth(model: nn.Module, data: Any, alpha: float = 0.5, batch_size: int = 64,
           targets: set[str] | None = None) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Apply SmoothQuant to every foldable group of ``model``, in place (see the module doc).

    Every scale is computed from the original weights and one statistics pass, then folded:
    the float model computes the same function (up to rounding).

    Args:
        model: the float model, changed in place.
        data: calibration inputs (a tensor, tuple or dict batch; split along dim 0).
        alpha: migration strength (0: nothing moves, 1: all the range goes to the weights).
        batch_size: samples per statistics pass.
        targets: the Linear layers to smooth (see :func:`plan_smoothing`); all by default.

    Returns:
        ``(smoothed, skipped)``: ``{linear: module its scale was folded into}`` and
        ``{"what", "why"}`` for each Linear (or LayerNorm) that could not be smoothed.

    Example:
        >>> smoothed, skipped = smooth(vit, calib, alpha=0.5)
        >>> smoothed["blocks.0.attn.q"]
        'blocks.0.norm1'
    """
    groups, skipped = plan_smoothing(model, targets)
    # sources are hooked too, to count their calls (a Linear may be both: fc1 in ln->fc1->fc2)
    hooked = list(dict.fromkeys(n for g in groups for n in (*g["consumers"], g["source"])))
    calls: dict[str, int] = {}
    stats = channel_absmax(model, hooked, data, batch_size, "input", calls)
    passes = math.ceil(B.size(data) / batch_size)
    scaled = []
    for g in groups:
        names = [g["source"], *g["consumers"]]
        if any(calls.get(n, 0) == 0 for n in names):
            skipped += _skip(g["consumers"], f"'{g['source']}' or its consumers never ran on "
                             "the calibration data; not smoothed")
        elif any(calls[n] != passes for n in names):
            shared = [n for n in names if calls[n] != passes]
            skipped += _skip(g["consumers"], f"{shared} run more than once per forward pass "
                             "(shared weights): a scale folded for one call would change the "
                             "others; not smoothed")
        else:
            layers = [model.get_submodule(c) for c in g["consumers"]]
            act = torch.stack([stats[c] for c in g["consumers"]]).amax(0)
            scaled.append((g, smooth_scales(act, [m.weight for m in layers], alpha)))
    with torch.no_grad():
        for g, s in scaled:
            _fold(model, g, s)
    return {c: g["source"] for g, _ in scaled for c in g["consumers"]}, skipped
