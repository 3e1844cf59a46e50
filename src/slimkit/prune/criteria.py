"""Channel importance criteria for structured pruning (one Registry: ``CRITERIA``).

A criterion scores every channel of a dependency group. Scores are aggregated over EVERY
coupled parameter of the group, not only the root layer: each member ``(param, dim)`` gives one
score per channel, normalized by that member's mean so that a 3x3 conv and a BatchNorm
weigh the same, and the member scores are summed. Buffers (running statistics) do not count.
Higher score = more important = kept.

==========  =================================================================================
name        score of channel c (per member, before normalization)
==========  =================================================================================
``l1``      sum of |w| over the channel's slice
``l2``      Euclidean norm of the channel's slice
``taylor``  sum of |grad * w| over the slice, accumulated over calibration batches
            (first-order Taylor expansion of the loss, Molchanov et al. 2019)
``bn_scale`` |gamma| of the group's BatchNorm/LayerNorm/GroupNorm (Liu et al. 2017); groups
            without a norm layer fall back to ``l1``
``fpgm``    sum of distances to the other channels' slices: channels near the geometric
            median are redundant (He et al. 2019)
``random``  seeded uniform scores (ablations)
==========  =================================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from slimkit.core.registry import Registry
from slimkit.graph.dependency import Group, Member
from slimkit.io import batch as B

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class ScoreInputs:
    """What a criterion reads: the group, the model's tensors, gradients, a seed.

    Attributes:
        group: the dependency group to score.
        params: ``{name: tensor}`` of the model's parameters.
        grads: ``{name: accumulated |grad * weight|}`` (only for ``taylor``).
        modules: ``{name: module}``.
        seed: for ``random``.
    """

    def __init__(self, group: Group, params: dict[str, torch.Tensor],
                 modules: dict[str, nn.Module], grads: dict[str, torch.Tensor] | None = None,
                 seed: int = 0) -> None:
        self.group, self.params, self.modules, self.grads, self.seed = \
            group, params, modules, grads, seed

    def matrices(self, source: dict[str, torch.Tensor] | None = None,
                 ) -> list[tuple[Member, torch.Tensor]]:
        """Per parameter member, a float64 ``[channels, k]`` matrix of each channel's slice."""
        source = self.params if source is None else source
        out = []
        for m in self.group.members:
            if m.param not in source:
                continue  # a buffer (running stats) or a tensor without gradient
            t = source[m.param].detach().to(torch.float64)
            idx = torch.as_tensor([i for ix in m.indices for i in ix], dtype=torch.long)
            sl = t.index_select(m.dim, idx).movedim(m.dim, 0)
            out.append((m, sl.reshape(len(m.indices), -1)))
        return out


Criterion = Callable[[ScoreInputs], np.ndarray]
CRITERIA: Registry[Criterion] = Registry("importance criterion")


def aggregate(per_member: list[torch.Tensor], size: int) -> np.ndarray:
    """Sum of per-member scores, each divided by its mean (members weigh the same)."""
    total = torch.zeros(size, dtype=torch.float64)
    for s in per_member:
        mean = s.mean()
        total += s / mean if mean > 0 else s
    return total.numpy()


@CRITERIA.register("l1")
def l1(inp: ScoreInputs) -> np.ndarray:
    return aggregate([m.abs().sum(1) for _, m in inp.matrices()], inp.group.size)


@CRITERIA.register("l2")
def l2(inp: ScoreInputs) -> np.ndarray:
    return aggregate([m.pow(2).sum(1).sqrt() for _, m in inp.matrices()], inp.group.size)


@CRITERIA.register("taylor")
def taylor(inp: ScoreInputs) -> np.ndarray:
    if inp.grads is None:
        raise ValueError("taylor needs accumulated gradients (give calibration data)")
    return aggregate([m.sum(1) for _, m in inp.matrices(inp.grads)], inp.group.size)


@CRITERIA.register("bn_scale")
def bn_scale(inp: ScoreInputs) -> np.ndarray:
    found = []
    for member, mat in inp.matrices():
        mod_name, _, attr = member.param.rpartition(".")
        if attr == "weight" and isinstance(inp.modules.get(mod_name), NORM_TYPES):
            found.append(mat.abs().sum(1))
    return aggregate(found, inp.group.size) if found else l1(inp)


@CRITERIA.register("fpgm")
def fpgm(inp: ScoreInputs) -> np.ndarray:
    # Distance of each channel to all others: small = close to the geometric median.
    return aggregate([torch.cdist(m, m).sum(1) for _, m in inp.matrices()], inp.group.size)


@CRITERIA.register("random")
def random(inp: ScoreInputs) -> np.ndarray:
    return np.random.default_rng(inp.seed * 100_003 + inp.group.id).random(inp.group.size)


def taylor_grads(model: nn.Module, batches: list[tuple[B.Inputs, torch.Tensor | None]],
                 ) -> dict[str, torch.Tensor]:
    """``sum over batches |grad * w|`` for every parameter (cross-entropy loss on the labels).

    Each batch's inputs are as the model takes them (:mod:`slimkit.io.batch`); the loss is on
    the judged output (:func:`slimkit.io.batch.select`): cross-entropy where it is
    ``[batch, classes]`` logits and labels are given, else its mean square.

    The model is used in eval mode (BatchNorm statistics are not updated); its weights and any
    gradients it held before are left as they were.
    """
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    saved = {n: p.grad for n, p in params.items()}  # the caller's gradients survive
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            out = B.select(B.call(model, x))
            loss = torch.nn.functional.cross_entropy(out, y) if y is not None and \
                out.dim() == 2 else out.float().pow(2).mean()
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += (p.grad.detach() * p.detach()).abs().to(torch.float64)
    finally:
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was_training)
    return acc
