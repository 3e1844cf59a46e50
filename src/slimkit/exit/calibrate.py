"""Thresholds chosen on a validation split: as low as the allowed top-1 drop permits.

For each sample of the split the exits' confidences and correctness are gathered once; a set
of thresholds then gives, without running the model again, where each sample exits, whether
it is right there, and what it cost. The thresholds are chosen greedily, shallowest exit
first (lower thresholds at shallow exits save the most): each exit's candidate values
(quantiles of its confidences) are tried from the highest down, given the thresholds already
chosen (the deeper exits still closed), and the exit takes the last one before the first
whose dynamic top-1 falls more than ``max_drop`` points below the static model's. Stopping
at the first failure is fixed-sequence testing (as in Angelopoulos et al.'s Learn then Test,
2021): picking instead the lowest candidate anywhere that fits would pick the one where the
noise of the validation split happens to favour it, and a bound computed for one threshold
does not hold for the best of many.

The drop measured on the validation split is an estimate: thresholds chosen so that it just
meets the target overshoot it on new data about half the time. With a ``level`` (0.95 for the
config's ``margin: ci95``) the thresholds keep instead the one-sided upper confidence bound of
the drop within the target: Newcombe's interval for a difference of paired proportions (his
method 10: the two top-1s' Wilson intervals combined with their correlation; the static and
the dynamic model are judged on the same samples), so the margin is as wide as the noise of
the validation split, narrow when the two models disagree on few samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slimkit.exit.model import EarlyExitModel, confidence
from slimkit.io import batch as B
from slimkit.measure.stats import wilson

CANDIDATES = 256  # threshold candidates per exit (quantiles of its confidences)


@dataclass
class ExitStats:
    """Per sample: each exit's confidence ``[N, K]`` and correctness ``[N, K]``, the final
    head's correctness ``[N]``."""

    conf: Tensor
    correct: Tensor
    final_correct: Tensor

    @property
    def n(self) -> int:
        return len(self.final_correct)


def gather(model: EarlyExitModel, batches: Iterable[tuple[Any, Tensor]]) -> ExitStats:
    """Run every exit on every batch (eval mode, no grad) and keep what thresholds need."""
    conf, correct, final_correct = [], [], []
    model.eval()
    with torch.inference_mode():
        for x, y in batches:
            exits, final = B.call(model.exit_outputs, x)
            conf.append(torch.stack([confidence(e, model.plan["confidence"]) for e in exits], 1))
            correct.append(torch.stack([e.argmax(-1) == y for e in exits], 1))
            final_correct.append(final.argmax(-1) == y)
    return ExitStats(torch.cat(conf), torch.cat(correct), torch.cat(final_correct))


def exits_taken(stats: ExitStats, thresholds: list[float | None]) -> Tensor:
    """Which exit each sample takes under ``thresholds`` (``K`` for the final head)."""
    k_all = stats.conf.shape[1]
    where = torch.full((stats.n,), k_all, dtype=torch.long)
    for k in reversed(range(k_all)):
        t = thresholds[k]
        if t is not None:
            where = torch.where(stats.conf[:, k] >= t, torch.full_like(where, k), where)
    return where


def dynamic_correct(stats: ExitStats, where: Tensor) -> Tensor:
    table = torch.cat([stats.correct, stats.final_correct.unsqueeze(1)], 1)
    return table.gather(1, where.unsqueeze(1)).squeeze(1)


def summarize(stats: ExitStats, thresholds: list[float | None],
              cost: list[float] | None = None) -> dict[str, Any]:
    """Top-1 of the static and dynamic model, the exit distribution, each exit's top-1 on the
    samples it takes, and (given each path's ``cost``, exits then final) the mean cost."""
    where = exits_taken(stats, thresholds)
    right = dynamic_correct(stats, where)
    k_all = stats.conf.shape[1]
    counts = torch.bincount(where, minlength=k_all + 1)
    table = torch.cat([stats.correct, stats.final_correct.unsqueeze(1)], 1)
    per_exit = [float(table[where == k, k].double().mean()) if counts[k] else None
                for k in range(k_all + 1)]
    out = {"n": stats.n, "static_top1": float(stats.final_correct.double().mean()),
           "top1": float(right.double().mean()),
           "exit_fraction": [float(c) / max(stats.n, 1) for c in counts],
           "exit_top1": per_exit,
           "exit_head_top1": [float(stats.correct[:, k].double().mean()) for k in range(k_all)]}
    if cost is not None:
        out["mean_cost"] = float(torch.tensor(cost, dtype=torch.float64)[where].mean())
    return out


def _candidates(values: Tensor) -> list[float]:
    """Up to :data:`CANDIDATES` distinct quantiles of ``values``, lowest first."""
    q = torch.linspace(0, 1, CANDIDATES, dtype=torch.float64)
    return sorted(set(torch.quantile(values.double(), q).tolist()))


def paired_drop_upper(a: int, b: int, c: int, d: int, level: float) -> float:
    """One-sided upper confidence bound (at ``level``) of ``p1 - p2``, the difference of two
    proportions on the same ``n = a + b + c + d`` samples, by Newcombe's paired method 10
    (Stat. Med. 17:2635, 1998).

    Args:
        a: samples both right; b: only the first right; c: only the second right; d: both
            wrong. For the top-1 drop: first = static, second = dynamic.
        level: one-sided confidence (0.95: the upper end of a two-sided 90% interval).

    Returns:
        The bound, as a fraction (``(b - c) / n`` plus the margin).

    Example:
        >>> round(paired_drop_upper(90, 3, 1, 6, 0.95), 4)
        0.0612
    """
    n = a + b + c + d
    if n < 1 or not 0.5 <= level < 1:
        raise ValueError(f"paired_drop_upper: need n >= 1 and 0.5 <= level < 1, got n={n}, "
                         f"level={level}")
    z = statistics.NormalDist().inv_cdf(level)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                        + (p2 - l2) ** 2))
    return (b - c) / n + eps


def drop_bound(static: Tensor, dynamic: Tensor, level: float | None) -> float:
    """The top-1 drop (fraction) of ``dynamic`` against ``static`` (per-sample correctness,
    same samples) that thresholds must keep within the target: the measured drop with no
    ``level``, else its one-sided upper bound (:func:`paired_drop_upper`)."""
    s, t = static.bool(), dynamic.bool()
    b, c = int((s & ~t).sum()), int((~s & t).sum())
    if level is None:
        return (b - c) / max(len(s), 1)
    a, d = int((s & t).sum()), int((~s & ~t).sum())
    return paired_drop_upper(a, b, c, d, level)


def choose(stats: ExitStats, max_drop: float, min_fraction: float = 0.0,
           level: float | None = None) -> list[float | None]:
    """Greedy shallow-first thresholds keeping top-1 within ``max_drop`` points (see the
    module docstring); an exit whose highest threshold does not fit stays closed (None). With a
    ``level``, the drop's one-sided upper confidence bound at that level must fit.

    An open exit that takes fewer than ``min_fraction`` of the samples costs every sample
    passing it a head and a step boundary for almost nothing: the least used such exit is
    closed and the others chosen again, until every open exit takes at least that share.
    """
    closed: set[int] = set()
    while True:
        thresholds = _greedy(stats, max_drop, closed, level)
        share = torch.bincount(exits_taken(stats, thresholds),
                               minlength=stats.conf.shape[1] + 1).double() / max(stats.n, 1)
        rare = [k for k, t in enumerate(thresholds) if t is not None and share[k] < min_fraction]
        if not rare:
            return thresholds
        closed.add(min(rare, key=lambda k: float(share[k])))


def _greedy(stats: ExitStats, max_drop: float, closed: set[int],
            level: float | None) -> list[float | None]:
    k_all = stats.conf.shape[1]
    thresholds: list[float | None] = [None] * k_all
    for k in range(k_all):
        if k in closed:
            continue
        for c in reversed(_candidates(stats.conf[:, k])):  # highest first, to a failure
            trial = [*thresholds[:k], c, *thresholds[k + 1:]]
            right = dynamic_correct(stats, exits_taken(stats, trial))
            if drop_bound(stats.final_correct, right, level) > max_drop / 100 + 1e-9:
                break
            thresholds[k] = c
    return thresholds


def sweep(val: ExitStats, test: ExitStats | None, cost: list[float],
          drops: Iterable[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0),
          min_fraction: float = 0.0, level: float | None = None) -> list[dict[str, Any]]:
    """Operating points as the allowed drop (and with it every threshold) sweeps: thresholds
    chosen on ``val`` (with the stage's margin ``level``), top-1 and mean cost measured on
    ``test`` (else ``val``)."""
    points = []
    for drop in drops:
        t = choose(val, drop, min_fraction, level)
        s = summarize(test if test is not None else val, t, cost)
        points.append({"max_drop": drop, "thresholds": t, "top1": s["top1"],
                       "mean_cost": s["mean_cost"], "exit_fraction": s["exit_fraction"]})
    return points

