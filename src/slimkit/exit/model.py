"""The early-exit model: a backbone cut into segments, one head per exit, and inference that
stops at the first exit confident enough.

``EarlyExitModel(backbone, plan)``: the plan (JSON) names the exits, each head's pooling and
sizes, the confidence measure and the thresholds; it is what an artifact replays
(:func:`rebuild`, registered as the ``early_exit`` transform), so a checkpoint is
architecture + plan + safetensors. ``state_dict`` holds ``backbone.*`` (the original names
under ``backbone.``) and ``heads.<k>.*``.

Inference (eval mode, thresholds set): a batch of one returns at the first exit whose
confidence reaches its threshold; in a larger batch every sample that exits is removed from
the state the later segments compute on, so its remaining blocks never run. A sample's
result does not depend on the batch it came in. In training mode, or without thresholds,
the forward is the backbone's own (the static model). Under ``torch.jit`` tracing (the ONNX
export of the whole model) every exit is computed and each sample's logits are selected with
``where``: the same values, without the saving; :mod:`slimkit.exit.onnx` exports the chain
that does stop.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.errors import ModelError
from slimkit.core.stages import register_rebuilder
from slimkit.exit.segments import Segment, split, trace
from slimkit.io import batch as B

PLAN_FORMAT = "slimkit-early-exit-plan"


def confidence(logits: Tensor, how: str) -> Tensor:
    """Per-sample confidence of ``[B, K]`` logits (higher = more confident), in float32.

    ``max_softmax``: max_k p_k; ``entropy``: sum_k p_k log p_k (minus the entropy, so 0 is
    certain); ``margin``: p_(1) - p_(2), the gap between the two most likely classes.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if how == "max_softmax":
        return logp.max(dim=-1).values.exp()
    if how == "entropy":
        return (logp.exp() * logp).sum(dim=-1)
    if how == "margin":
        top = logp.topk(min(2, logp.shape[-1]), dim=-1).values.exp()
        return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    raise ModelError(f"early_exit: unknown confidence '{how}' (max_softmax, entropy, margin)")


class ExitHead(nn.Module):
    """Pooling, a LayerNorm for token features, then a Linear to the classes; for a conv
    map, optionally a 3x3 stride-2 convolution (+ BatchNorm, ReLU) before the pooling.

    Args:
        channels: the Linear's input width (the channels pooled, times 4 for ``grid``).
        num_classes: width of the model's logits.
        pool: ``grid`` (the mean of each quarter of a ``[B, C, H, W]`` map: the head
            keeps where things are, which a shallow exit needs), ``spatial`` (mean over dims
            2+ of ``[B, C, ...]``), ``mean`` (over the tokens
            of ``[B, T, D]``), ``cls`` (the first token of ``[B, T, D]``) or ``none``
            (``[B, C]`` as it is).
        conv: ``[in, out]`` channels of the convolution before the pooling, or None.
    """

    def __init__(self, channels: int, num_classes: int, pool: str,
                 conv: list[int] | None = None) -> None:
        super().__init__()
        self.pool = pool
        tokens = pool in ("mean", "cls")
        self.conv = nn.Identity() if not conv else nn.Sequential(
            nn.Conv2d(conv[0], conv[1], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(conv[1]), nn.ReLU())
        self.norm = nn.LayerNorm(channels) if tokens else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.pool == "grid":
            x = _quarters(x)
        elif self.pool == "spatial":
            x = x.flatten(2).mean(dim=2)
        elif self.pool == "mean":
            x = x.mean(dim=1)
        elif self.pool == "cls":
            x = x[:, 0]
        return self.fc(self.norm(x))


def _quarters(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, 4C]``: the mean of each quarter of the map (split at ``H // 2``
    and ``W // 2``), top-left, top-right, bottom-left, bottom-right.

    Written as two products with constant averaging matrices (rows: ``[2, H]``, columns:
    ``[W, 2]``), so that it exports to ONNX as four small static operators whatever the sizes
    (slices of a traced shape were two dozen, a cost every sample passing the exit pays).
    """
    h, w = int(x.shape[2]), int(x.shape[3])
    rows = _halves(h, x).unsqueeze(0).unsqueeze(0)  # [1, 1, 2, H]
    cols = _halves(w, x).T  # [W, 2]
    return (rows @ (x @ cols)).permute(0, 2, 3, 1).flatten(1)


def _halves(n: int, like: Tensor) -> Tensor:
    """``[2, n]``: row 0 averages the first ``n // 2`` positions, row 1 the others."""
    a, b = n // 2, n - n // 2
    return torch.tensor([[1.0 / a] * a + [0.0] * b, [0.0] * a + [1.0 / b] * b],
                        dtype=like.dtype, device=like.device)


class EarlyExitModel(nn.Module):
    """A backbone with exit heads after named blocks (see the module docstring).

    Args:
        backbone: the model (used as is, not copied).
        plan: ``{"format", "exits": [{"block", "pool", "channels", "conv"?}], "num_classes",
            "confidence", "thresholds": [float | None] or None}``; exits in execution order.

    Attributes:
        dynamic: stop early in eval mode (True) or always run to the end (False).
    """

    def __init__(self, backbone: nn.Module, plan: dict[str, Any]) -> None:
        super().__init__()
        if plan.get("format") != PLAN_FORMAT:
            raise ValueError(f"not an early-exit plan (format {plan.get('format')!r})")
        self.backbone = backbone
        self.plan = copy.deepcopy(plan)
        self.heads = nn.ModuleList(ExitHead(int(e["channels"]), int(plan["num_classes"]),
                                            str(e["pool"]), e.get("conv"))
                                   for e in plan["exits"])
        self.dynamic = True
        self._cache: tuple[tuple[int, ...], list[Segment]] | None = None

    @property
    def blocks(self) -> list[str]:
        return [e["block"] for e in self.plan["exits"]]

    @property
    def thresholds(self) -> list[float | None] | None:
        return self.plan.get("thresholds")

    def set_thresholds(self, thresholds: list[float | None] | None) -> None:
        """Per exit the confidence at or above which a sample stops there (None: never)."""
        if thresholds is not None and len(thresholds) != len(self.heads):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.heads)} exits")
        self.plan["thresholds"] = None if thresholds is None else [
            None if t is None else float(t) for t in thresholds]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # traced segments are rebuilt on first use
        return state

    def judged(self, out: Any) -> Tensor:
        """The backbone's judged output (the plan's ``output`` key, else the one
        :func:`slimkit.io.batch.judging` names, else the first); a tensor as it is."""
        return out if isinstance(out, Tensor) else B.select(out, self.plan.get("output"))

    def segments(self) -> list[Segment]:
        """The backbone cut after each exit block, traced on first use and again whenever a
        submodule of the backbone was replaced or converted (``.to``, a later stage)."""
        key = tuple(id(m) for m in self.backbone.modules()) + tuple(
            id(t) for t in self.backbone.parameters()) + tuple(
            id(t) for t in self.backbone.buffers())
        if self._cache is None or self._cache[0] != key:
            segments, order = split(trace(self.backbone, self.blocks, self.plan.get("hf")),
                                    self.blocks)
            if order != self.blocks:
                raise ValueError(f"exits {self.blocks} are not in execution order {order}")
            self._cache = (key, segments)
        return self._cache[1]

    def exit_outputs(self, *args: Any, **kwargs: Any) -> tuple[list[Tensor], Tensor]:
        """Every exit's logits and the final logits, for the whole batch (training,
        calibration, reference checks)."""
        segments = self.segments()
        state, logits = None, []
        for k, seg in enumerate(segments[:-1]):
            state, feat = seg.module(*args, **kwargs) if k == 0 else seg.module(*state)
            logits.append(self.heads[k](feat))
        out = segments[-1].module(*state) if segments[:-1] else self.backbone(*args, **kwargs)
        return logits, self.judged(out)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.training or not self.dynamic or self.thresholds is None:
            return self.judged(self.backbone(*args, **kwargs))
        if torch.jit.is_tracing():
            return self._selected(*args, **kwargs)
        return self._stopping(*args, **kwargs)

    def _passes(self, conf: Tensor, k: int) -> Tensor:
        t = self.thresholds[k]
        return torch.zeros_like(conf, dtype=torch.bool) if t is None else conf >= t

    def _selected(self, *args: Any, **kwargs: Any) -> Tensor:
        """All exits computed, each sample's logits picked by ``where`` (export form)."""
        exits, final = self.exit_outputs(*args, **kwargs)
        out = final
        for k in reversed(range(len(exits))):
            take = self._passes(confidence(exits[k], self.plan["confidence"]), k)
            out = torch.where(take.unsqueeze(-1), exits[k].to(out.dtype), out)
        return out

    def _stopping(self, *args: Any, **kwargs: Any) -> Tensor:
        """Run segment by segment; drop the rows of samples that exited."""
        segments = self.segments()
        out: Tensor | None = None
        rows: Tensor | None = None  # the original rows of the samples still running
        state: Any = None
        for k, seg in enumerate(segments[:-1]):
            state, feat = seg.module(*args, **kwargs) if k == 0 else seg.module(*state)
            logits = self.heads[k](feat)
            if out is None:
                out = logits.new_empty((len(logits), logits.shape[-1]))
                rows = torch.arange(len(logits), device=logits.device)
            done = self._passes(confidence(logits, self.plan["confidence"]), k)
            n_done = int(done.sum())
            if n_done:
                out[rows[done]] = logits[done]
                if n_done == len(done):
                    return out
                keep = (~done).nonzero().squeeze(1)
                rows = rows[keep]
                state = tuple(None if v is None else v.index_select(0, keep)
                              for v in state)
        final = self.judged(segments[-1].module(*state))
        if out is None:
            return final
        out[rows] = final.to(out.dtype)
        return out


def exit_index(model: EarlyExitModel, *args: Any, **kwargs: Any) -> Tensor:
    """Which exit each sample takes (``len(exits)`` for the final head), computed densely."""
    exits, _ = model.exit_outputs(*args, **kwargs)
    where = torch.full((len(exits[0]) if exits else 0,), len(exits), dtype=torch.long)
    for k in reversed(range(len(exits))):
        take = model._passes(confidence(exits[k], model.plan["confidence"]), k)
        where = torch.where(take, torch.full_like(where, k), where)
    return where


@register_rebuilder("early_exit")
def rebuild(module: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: wrap a freshly built backbone with the plan's heads and thresholds
    (structure only; the weights are loaded afterwards)."""
    return EarlyExitModel(module, plan)
