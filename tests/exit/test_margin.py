"""The thresholds' safety margin: the one-sided upper bound of the top-1 drop (Newcombe's
paired interval) against a second implementation and against its coverage on simulated
validation splits, the greedy choice against brute force, and the stage's record of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimkit.core.stages import StageContext
from slimkit.exit import calibrate as C
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.stage import early_exit

Z95_ONE_SIDED = 1.6448536269514722


def _wilson_roots(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval as the two roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    p = k / n
    roots = np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real
    return float(min(roots)), float(max(roots))


def _newcombe_paired_upper(a: int, b: int, c: int, d: int, z: float) -> float:
    """Newcombe (1998) paired method 10, upper limit, written from the paper's formulas."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    _, u1 = _wilson_roots(a + b, n, z)
    l2, _ = _wilson_roots(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0 if den == 0 else (a * d - b * c) / math.sqrt(den)
    return p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                               + (p2 - l2) ** 2)


@pytest.mark.parametrize("counts", [(90, 3, 1, 6), (5000, 40, 30, 930), (10, 0, 4, 2),
                                    (300, 12, 0, 5), (40, 2, 2, 0)])
def test_the_bound_matches_a_second_implementation_of_newcombes_formula(counts):
    got = C.paired_drop_upper(*counts, 0.95)
    assert got == pytest.approx(_newcombe_paired_upper(*counts, Z95_ONE_SIDED), abs=1e-9)
    assert got >= (counts[1] - counts[2]) / sum(counts)


def test_the_bound_covers_the_true_drop_95_percent_of_the_time():
    # A population where the dynamic model is 1 point worse: 2% of samples only the static
    # model gets right, 1% only the dynamic one. 2,000 validation splits of 2,000 samples.
    rng = np.random.default_rng(0)
    draws = rng.multinomial(2000, [0.88, 0.02, 0.01, 0.09], size=2000)
    bound = np.array([C.paired_drop_upper(*map(int, d), 0.95) for d in draws])
    measured = (draws[:, 1] - draws[:, 2]) / 2000
    assert 0.93 <= float((bound >= 0.01).mean()) <= 0.97  # an unpaired bound covers ~100%
    assert 0.40 <= float((measured >= 0.01).mean()) <= 0.60  # no margin: a coin flip
    loose = np.array([C.paired_drop_upper(*map(int, d), 0.75) for d in draws])
    assert 0.70 <= float((loose >= 0.01).mean()) <= 0.80


def test_drop_bound_counts_the_paired_outcomes():
    static = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    dynamic = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    # a = 3 (both right), b = 2 (static only), c = 1 (dynamic only), d = 2 (both wrong)
    assert C.drop_bound(static, dynamic, None) == pytest.approx(1 / 8)
    assert C.drop_bound(static, dynamic, 0.95) == pytest.approx(
        _newcombe_paired_upper(3, 2, 1, 2, Z95_ONE_SIDED), abs=1e-12)


def _one_exit_stats(n: int = 600, seed: int = 0) -> C.ExitStats:
    """One exit whose correctness falls with its confidence, a final head right on 92%."""
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, 1, generator=gen)
    correct = torch.rand(n, 1, generator=gen) < 0.5 + 0.5 * conf
    final = torch.rand(n, generator=gen) < 0.92
    return C.ExitStats(conf, correct, final)


@pytest.mark.parametrize("level", [None, 0.95, 0.8])
def test_choose_lowers_the_threshold_until_the_first_bound_that_does_not_fit(level):
    stats = _one_exit_stats()
    got = C.choose(stats, 1.0, level=level)[0]
    fits = []
    for t in C._candidates(stats.conf[:, 0]):
        right = torch.where(stats.conf[:, 0] >= t, stats.correct[:, 0], stats.final_correct)
        s, r = stats.final_correct, right
        counts = [int(v.sum()) for v in (s & r, s & ~r, ~s & r, ~s & ~r)]
        bound = ((counts[1] - counts[2]) / len(s) if level is None else
                 _newcombe_paired_upper(*counts, _z(level)))
        fits.append((t, bound <= 0.01 + 1e-9))
    # Fixed-sequence testing: from the highest candidate down, the last before a failure.
    first_fail = next(i for i in reversed(range(len(fits))) if not fits[i][1])
    assert got == fits[first_fail + 1][0]
    if level is not None:  # the margin costs exits: the threshold is at least as high
        assert got >= C.choose(stats, 1.0, level=None)[0]


def test_a_lower_threshold_that_fits_again_by_chance_is_not_taken():
    # Ten samples, most confident first; the exit is wrong on samples 2 and 3, the final head
    # on samples 4-7. Lowering the threshold: drop 0, 0, 1, 2 (over a 1-sample budget), then
    # 1, 0, -1, -2, ... as the exit rights the final head's errors: the drop curve dips
    # back within budget. Fixed-sequence testing stops at its first failure.
    conf = torch.linspace(0.95, 0.05, 10).unsqueeze(1)
    correct = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool).unsqueeze(1)
    final = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    t = C.choose(C.ExitStats(conf, correct, final), 10.0)[0]
    assert (conf[:, 0] >= t).nonzero().flatten().tolist() == [0, 1, 2]  # not all ten


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(level)


def test_the_config_takes_ci95_none_or_a_level():
    assert EarlyExitConfig().margin_level() == 0.95
    assert EarlyExitConfig(margin="none").margin_level() is None
    assert EarlyExitConfig(margin=0.9).margin_level() == 0.9
    for bad in (1.0, 0.3, "ci99"):
        with pytest.raises(ValueError, match="margin"):
            EarlyExitConfig(margin=bad)


def test_the_stage_keeps_the_bound_within_the_target_and_records_it(trained_resnet):
    model, data = trained_resnet
    cfg = EarlyExitConfig.model_validate({"max_drop": 10.0, "margin": "ci95",
                                          "latency_samples": 0, "report_split": "none",
                                          "train": {"epochs": 2, "batch_size": 32, "lr": 1e-2}})
    out, record = early_exit(model, cfg, StageContext(data=data, progress=False))
    margin = record.details["margin"]
    val = record.details["val"]
    drop = 100 * (val["static_top1"] - val["top1"])
    assert margin["level"] == 0.95 and margin["val_drop"] == pytest.approx(drop, abs=1e-9)
    assert margin["val_drop"] <= margin["val_drop_bound"] <= 10.0 + 1e-9
    # The recorded bound recounted from the validation split with the chosen exits.
    from slimkit.data.split import split_indices
    from slimkit.exit.model import exit_index

    cal = torch.from_numpy(split_indices(data.y_train, 0.2, seed=0)[1])
    x, y = data.x_train[cal], data.y_train[cal]
    with torch.no_grad():
        static = model.module(x).argmax(1) == y
        dynamic = out.module(x).argmax(1) == y
        assert len(exit_index(out.module, x)) == len(y)
    counts = [int(v.sum()) for v in (static & dynamic, static & ~dynamic, ~static & dynamic,
                                     ~static & ~dynamic)]
    assert margin["val_drop_bound"] == pytest.approx(
        100 * _newcombe_paired_upper(*counts, Z95_ONE_SIDED), abs=1e-9)
