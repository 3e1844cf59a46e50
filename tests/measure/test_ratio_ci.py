"""Latency ratios with a confidence interval: paired per-round ratios, order-statistic CI."""

from __future__ import annotations

import random

import pytest

from slimkit.measure import ratio_ci, time_interleaved
from slimkit.pipeline.runner import _changes, _flag_slower


def test_order_statistics_of_thirty_pairs():
    old = [1.0] * 30
    new = [1.0 + r / 100 for r in range(30)]  # ratios 1.00 ... 1.29, shuffled below
    random.Random(0).shuffle(new)
    median, lo, hi = ratio_ci(new, old)
    ranked = sorted(new)
    # n = 30: ranks 9 and 22 (1-based) of the sorted ratios, the median between 15 and 16
    assert (median, lo, hi) == (pytest.approx((ranked[14] + ranked[15]) / 2), ranked[8],
                                ranked[21])


def test_the_interval_covers_a_true_ratio_of_one_about_95_percent_of_the_time():
    rng = random.Random(1)
    misses = 0
    for _ in range(400):
        noise = [rng.lognormvariate(0, 0.2) for _ in range(60)]
        old = [rng.lognormvariate(0, 0.2) for _ in range(30)]
        _, lo, hi = ratio_ci(noise[:30], old)
        misses += not lo <= 1.0 <= hi
    assert misses / 400 < 0.08  # nominal 5%; the rank rounding makes it conservative


def test_a_clear_slowdown_is_slower_and_noise_is_no_difference():
    rng = random.Random(2)
    old = [rng.uniform(1.0, 1.1) for _ in range(30)]
    slow = [t * 1.5 for t in old]
    wobble = [1 + d / 500 for d in range(-15, 15)]  # +-3%, centred on 1
    rng.shuffle(wobble)
    same = [t * w for t, w in zip(slow, wobble, strict=True)]  # the final vs stage-0
    lat = {"torch": {}, "onnxruntime": {"32": {
        "baseline": {"samples_ms": old}, "stage-0": {"samples_ms": slow},
        "final": {"samples_ms": same}}}}
    changes = _changes(lat, ["baseline", "stage-0", "final"])
    assert changes["stage-0"]["onnxruntime"]["32"]["verdict"] == "slower"
    assert changes["stage-0"]["onnxruntime"]["32"]["time_ratio"] == pytest.approx(1.5)
    assert changes["final"]["onnxruntime"]["32"]["verdict"] == "no difference"
    stages = [{"index": 0, "kind": "ptq"}, {"index": 1, "kind": "magnitude_prune"}]
    logged: list[str] = []
    _flag_slower(stages, changes, "onnxruntime", logged.append)
    assert stages[0]["flags"] == [logged[0].removeprefix("warning: ")]
    assert logged[0].startswith("warning: stage 1 (ptq) made onnxruntime slower at batch 32: "
                                "1.50x the time of the model before it (95% CI 1.50-1.50)")
    assert "flags" not in stages[1] and len(logged) == 1


def test_samples_are_kept_only_when_asked():
    fns = {"a": lambda: None, "b": lambda: None}
    assert "samples_ms" not in time_interleaved(fns, warmup=0, repeats=3)["a"]
    kept = time_interleaved(fns, warmup=0, repeats=3, keep_samples=True)
    assert len(kept["a"]["samples_ms"]) == len(kept["b"]["samples_ms"]) == 3


def test_the_overall_speedup_carries_its_interval():
    from slimkit.pipeline.runner import _comparison

    lat = {"torch": {}, "onnxruntime": {"1": {
        "baseline": {"samples_ms": [2.0 + i / 100 for i in range(30)]},
        "final": {"samples_ms": [1.0 + i / 200 for i in range(30)]}}}}
    overall = _changes(lat, ["baseline", "final"])["final"]
    stats = {"onnxruntime": {"1": {"median_ms": 1.0}}, "torch": {}}
    base = {"size_bytes": 4, "onnx_size_bytes": 4,
            "latency": {"onnxruntime": {"1": {"median_ms": 2.0}}, "torch": {}}}
    cmp = _comparison(base, {"size_bytes": 2, "onnx_size_bytes": 2, "latency": stats}, overall)
    row = cmp["onnxruntime"]["1"]
    assert row["speedup"] == 2.0 and row["speedup_ci95"] == [pytest.approx(2.0)] * 2
    assert row["within_noise"] is False
