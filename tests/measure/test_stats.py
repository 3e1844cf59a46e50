"""Intervals and tests for accuracy claims, against published values and second computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimkit.measure.stats import (
    Z95,
    accuracy_ci,
    bootstrap_ci,
    mcnemar,
    newcombe,
    wilson,
)


def _wilson_by_roots(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    # Second implementation: the Wilson bounds are the roots in p of
    # (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0.
    ph = k / n
    roots = np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph])
    return float(roots.real.min()), float(roots.real.max())


def test_wilson_95_of_100_is_the_textbook_interval():
    lo, hi = wilson(95, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.888, 0.978)


@pytest.mark.parametrize(("k", "n"), [(95, 100), (1, 3), (500, 1000), (9963, 10000),
                                      (7, 7), (0, 5)])
def test_wilson_agrees_with_the_quadratic_roots(k, n):
    np.testing.assert_allclose(wilson(k, n), _wilson_by_roots(k, n), rtol=0, atol=1e-9)


def test_wilson_holds_the_estimate_and_narrows_with_n():
    widths = []
    for n in (100, 1000, 10000):
        lo, hi = wilson(int(0.9 * n), n)
        assert lo < 0.9 < hi
        widths.append(hi - lo)
    # Width shrinks like 1/sqrt(n): a tenfold n gives ~sqrt(10) narrower.
    assert widths[0] / widths[1] == pytest.approx(math.sqrt(10), rel=0.05)
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.02)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson(11, 10)


def test_accuracy_ci_records_value_counts_and_method():
    rec = accuracy_ci(950, 1000)
    assert rec["value"] == 0.95 and (rec["correct"], rec["n"]) == (950, 1000)
    assert rec["method"] == "wilson" and rec["ci95"] == list(wilson(950, 1000))


def test_mcnemar_matches_the_exact_binomial_reference():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.9
    b = a.copy()
    flip = rng.choice(500, 40, replace=False)
    b[flip[:30]] = False  # b loses 30 that a gets
    b[flip[30:]] = True
    res = mcnemar(a, b)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    assert (res["a_only"], res["b_only"]) == (a_only, b_only)
    ref = scipy_stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
    assert res["p_value"] == pytest.approx(ref, rel=1e-9)
    assert res["differs"] == (ref < 0.05)
    assert res["accuracy_difference"] == pytest.approx(a.mean() - b.mean())


def test_mcnemar_hand_computed_and_identical_models():
    # 10 vs 2 discordant: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
    assert mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)["p_value"] == 158 / 4096
    same = mcnemar([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["p_value"] == 1.0 and not same["differs"]
    with pytest.raises(ValueError, match="equal-length"):
        mcnemar([1, 0], [1])


def test_a_gap_of_a_few_images_on_1000_is_not_a_difference():
    # The distill_hinton situation: teacher 963/1000 vs student 957/1000 on the same images,
    # 6 net images apart. Paired: 10 images only the teacher gets, 4 only the student.
    teacher = np.r_[np.ones(953), np.ones(10), np.zeros(4), np.zeros(33)].astype(bool)
    student = np.r_[np.ones(953), np.zeros(10), np.ones(4), np.zeros(33)].astype(bool)
    assert not mcnemar(teacher, student)["differs"]
    assert not newcombe(963, 1000, 957, 1000)["differs"]


def test_newcombe_reproduces_the_published_example():
    # Newcombe (1998), Stat. Med. 17:873, Table II, example (a): 56/70 - 48/80, method 10.
    res = newcombe(56, 70, 48, 80)
    assert res["difference"] == pytest.approx(0.2)
    assert [round(v, 4) for v in res["ci95"]] == [0.0524, 0.3339]
    assert res["differs"]


def test_bootstrap_of_a_mean_matches_the_normal_interval_on_a_large_sample():
    x = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    est, lo, hi = bootstrap_ci(x, rounds=4000, seed=0)
    half = Z95 * x.std(ddof=1) / math.sqrt(len(x))
    assert est == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert bootstrap_ci(x, rounds=500, seed=3) == bootstrap_ci(x, rounds=500, seed=3)
