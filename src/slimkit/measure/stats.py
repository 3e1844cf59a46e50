"""Statistics for honest claims: intervals for accuracies and means, tests for differences.

An accuracy measured on ``n`` samples is a binomial proportion: on 1,000 test images one
image is 0.1 point and the standard error near 95% is ~0.7 point, so "within 0.2 point" says
nothing unless the interval says so. This module gives

- :func:`wilson`: the Wilson score interval of a proportion (good coverage also near 0 or 1,
  where the normal "p +- 1.96 se" interval leaves [0, 1] or collapses to a point);
- :func:`accuracy_ci`: an accuracy with its interval, as benchmarks and reports record it;
- :func:`mcnemar`: the exact McNemar test of two classifiers on the *same* samples (paired:
  only the samples they disagree on carry information, which makes it far more sensitive
  than comparing two intervals);
- :func:`newcombe`: the interval of the difference of two independent proportions (for
  accuracies on different samples, or when only counts are known);
- :func:`bootstrap_ci`: a percentile bootstrap interval of a mean (or any statistic) over
  seeds or rounds. Ratios of paired timings have :func:`slimkit.measure.latency.ratio_ci`.

Everything is pure Python / numpy in float64, deterministic for a given seed.

Example:
    >>> [round(v, 3) for v in wilson(95, 100)]
    [0.888, 0.978]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``.

    It is the set of ``p`` whose score test does not reject ``k`` successes in ``n`` trials:
    the roots of ``(k/n - p)^2 = z^2 p (1 - p) / n``.

    Args:
        k: successes (correct predictions), ``0 <= k <= n``.
        n: trials (samples), ``n >= 1``.
        z: the normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)`` within [0, 1].

    Raises:
        ValueError: ``n < 1`` or ``k`` outside ``[0, n]``.

    Example:
        >>> [round(v, 4) for v in wilson(0, 10)]
        [0.0, 0.2775]
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # k = 0 or n: the bound equals 0 or 1 exactly; rounding must not push it past.
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def accuracy_ci(k: int, n: int, z: float = Z95) -> dict[str, Any]:
    """An accuracy as reports and benchmarks record it: value, Wilson 95% interval, counts.

    Example:
        >>> accuracy_ci(95, 100)["ci95"]  # doctest: +ELLIPSIS
        [0.888..., 0.978...]
    """
    lo, hi = wilson(k, n, z)
    return {"value": k / n, "ci95": [lo, hi], "correct": int(k), "n": int(n),
            "method": "wilson"}


def accuracy_ci_of(top1: float, n: int) -> dict[str, Any]:
    """:func:`accuracy_ci` from a measured fraction: ``k = round(top1 * n)``."""
    return accuracy_ci(int(round(top1 * n)), n)


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` or fewer (or as extreme above) in Binomial(n, 1/2)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray,
            alpha: float = 0.05) -> dict[str, Any]:
    """Exact McNemar test: do classifiers ``a`` and ``b`` differ on the same samples?

    Samples both get right (or both wrong) say nothing about the difference; under "no
    difference", each of the ``n01 + n10`` discordant samples is equally likely to favour
    either, so ``n10`` is Binomial(n01 + n10, 1/2) (exact, no continuity correction needed).

    Args:
        a_correct, b_correct: per-sample correctness of the two models, same samples, same
            order (e.g. ``pred == y`` as bool arrays).
        alpha: the significance level of ``differs``.

    Returns:
        ``{"a_only": n10, "b_only": n01, "p_value", "differs": p < alpha,
        "accuracy_difference": acc_a - acc_b, "n", "method"}``.

    Raises:
        ValueError: lengths differ or no samples.

    Example:
        >>> round(mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)["p_value"], 4)
        0.0386
    """
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"mcnemar: give two equal-length, non-empty 1-D correctness arrays, "
                         f"got shapes {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = _binom_two_sided(min(a_only, b_only), a_only + b_only)
    return {"a_only": a_only, "b_only": b_only, "p_value": p, "differs": p < alpha,
            "accuracy_difference": (a_only - b_only) / len(a), "n": len(a),
            "method": "exact McNemar (paired, same samples)"}


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> dict[str, Any]:
    """95% interval of ``k1/n1 - k2/n2`` for independent samples (Newcombe's hybrid score
    interval, his method 10, built from the two Wilson intervals).

    Use it when the two accuracies are not on the same samples, or only counts are known;
    on the same samples :func:`mcnemar` is the sharper test.

    Returns:
        ``{"difference", "ci95": [low, high], "differs": the interval excludes 0, "method"}``.

    Example:
        >>> [round(v, 4) for v in newcombe(56, 70, 48, 80)["ci95"]]
        [0.0524, 0.3339]
    """
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"difference": d, "ci95": [lo, hi], "differs": lo > 0 or hi < 0,
            "method": "Newcombe hybrid score (independent samples)"}


def bootstrap_ci(values: Sequence[float] | np.ndarray,
                 statistic: Callable[[np.ndarray], float] = np.mean, rounds: int = 10_000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (seeds, rounds).

    With few values (3 seeds) the interval is wide and its coverage approximate: report the
    values themselves beside it, and let per-seed criteria hold per seed.

    Returns:
        ``(statistic(values), low, high)``.

    Raises:
        ValueError: no values, or ``level`` outside (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: need a non-empty 1-D sample and 0 < level < 1, got "
                         f"shape {v.shape} and level {level}")
    rng = np.random.default_rng(seed)
    draws = v[rng.integers(0, len(v), size=(rounds, len(v)))]
    stats = np.apply_along_axis(statistic, 1, draws)
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(statistic(v)), float(lo), float(hi)
