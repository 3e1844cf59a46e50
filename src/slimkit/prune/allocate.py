"""How many channels each group keeps (one Registry: ``ALLOCATORS``), and target search.

``uniform`` removes the same share of every group; ``global`` ranks every channel of every
group on one scale (scores divided by their group's mean) and removes the lowest, never more
than ``max_layer_ratio`` of one group. Kept counts are rounded to a multiple of ``round_to`` and
never reach zero. :func:`search_ratio` finds the ratio that brings a *measured* quantity
(FLOPs, parameters, latency) to a target by bisection, and says when it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from slimkit.core.registry import Registry


@dataclass
class AllocRequest:
    """Inputs of an allocator.

    Attributes:
        sizes: ``{group id: channels}``.
        scores: ``{group id: importance per channel}`` (higher = keep).
        ratio: share of channels to remove, in ``[0, 1)``.
        max_layer_ratio: at most this share of one group is removed.
        round_to: kept counts are a multiple of this (when the group is at least that big).
        unit_round: ``{group id: False}`` for groups whose channels are heads or conv groups,
            which are not rounded.
    """

    sizes: dict[int, int]
    scores: dict[int, np.ndarray]
    ratio: float
    max_layer_ratio: float = 0.9
    round_to: int = 1
    unit_round: dict[int, bool] | None = None


Allocator = Callable[[AllocRequest], dict[int, int]]
ALLOCATORS: Registry[Allocator] = Registry("ratio allocation")


def round_keep(keep: float, size: int, round_to: int) -> int:
    """Round a kept count to a multiple of ``round_to``; at least ``round_to`` (or 1), at most size.

    Example:
        >>> round_keep(13.2, 32, 8)
        16
    """
    if keep >= size:
        return size  # nothing to remove: rounding must never prune a layer left whole
    if round_to > 1 and size >= round_to:
        # Round up, so rounding never removes more channels than the allocation asked for.
        k = max(round_to, round_to * math.ceil(keep / round_to - 1e-9))
        return min(k, size)
    return int(min(size, max(1, round(keep))))


def _rounded(req: AllocRequest, keep: dict[int, float]) -> dict[int, int]:
    out = {}
    for g, k in keep.items():
        rt = req.round_to if (req.unit_round or {}).get(g, True) else 1
        floor = max(1, math.ceil(req.sizes[g] * (1 - req.max_layer_ratio)))
        out[g] = max(min(floor, req.sizes[g]), round_keep(k, req.sizes[g], rt))
    return out


@ALLOCATORS.register("uniform")
def uniform(req: AllocRequest) -> dict[int, int]:
    ratio = min(req.ratio, req.max_layer_ratio)
    return _rounded(req, {g: n * (1 - ratio) for g, n in req.sizes.items()})


@ALLOCATORS.register("global")
def global_ranking(req: AllocRequest) -> dict[int, int]:
    entries = []
    for g, s in req.scores.items():
        s = np.asarray(s, dtype=np.float64)
        mean = s.mean() if s.size and s.mean() > 0 else 1.0
        entries += [(float(v) / mean, g) for v in s]
    entries.sort(key=lambda e: e[0])
    budget = int(round(req.ratio * len(entries)))
    cap = {g: math.floor(req.max_layer_ratio * n) for g, n in req.sizes.items()}
    removed = dict.fromkeys(req.sizes, 0)
    for _, g in entries:
        if budget <= 0:
            break
        if removed[g] < min(cap[g], req.sizes[g] - 1):
            removed[g] += 1
            budget -= 1
    return _rounded(req, {g: n - removed[g] for g, n in req.sizes.items()})


def tie_counts(keep: dict[int, int], ties: list[list[int]], req: AllocRequest) -> dict[int, int]:
    """Give the groups of each tie one kept count: the mean of the counts the allocator gave
    them, rounded as it rounds (a width set once for many layers, as a transformers config's
    ``intermediate_size``). The channels each group keeps are still its own best ones.

    Example:
        >>> tie_counts({0: 30, 1: 34, 2: 5}, [[0, 1]], AllocRequest({0: 64, 1: 64, 2: 8}, {}, .5))
        {0: 32, 1: 32, 2: 5}
    """
    out = dict(keep)
    for tie in ties:
        members = [g for g in tie if g in keep]
        if not members:
            continue
        mean = sum(keep[g] for g in members) / len(members)
        k = min(_rounded(req, dict.fromkeys(members, mean)).values())
        out.update(dict.fromkeys(members, k))
    return out


@dataclass
class SearchResult:
    """Outcome of a target search: the ratio chosen, what was measured, and whether it made it."""

    ratio: float
    achieved: float
    asked: float
    reached: bool
    trials: list[dict[str, float]]


def search_ratio(measure: Callable[[float], float], target: float, hi: float,
                 iters: int = 10, tol: float = 0.01) -> SearchResult:
    """Smallest ratio whose measured fraction (pruned / original) is at most ``target``.

    Args:
        measure: ``ratio -> measured fraction`` (e.g. FLOPs after / FLOPs before); assumed to
            fall as the ratio grows.
        target: the fraction to reach (0.5 = keep half).
        hi: the largest ratio to try.

    Returns:
        The chosen ratio; when even ``hi`` misses the target, ``reached`` is False and the
        ratio is ``hi`` (the best that could be done).
    """
    trials = []

    def run(r: float) -> float:
        v = measure(r)
        trials.append({"ratio": r, "fraction": v})
        return v

    top = run(hi)
    if top > target:
        return SearchResult(hi, top, target, False, trials)
    lo, best, best_v = 0.0, hi, top
    for _ in range(iters):
        mid = (lo + best) / 2
        v = run(mid)
        if v <= target:
            best, best_v = mid, v
        else:
            lo = mid
        if best - lo < 1e-3 or target - best_v < tol:
            break
    return SearchResult(best, best_v, target, True, trials)
