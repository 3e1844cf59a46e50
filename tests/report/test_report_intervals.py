"""Every latency ratio in the report carries its 95% interval; one that holds 1 is "no change"
and a stage that made the target runtime slower is flagged with the layers responsible."""

from __future__ import annotations

import pytest
from tests.report.test_report_html import row, tables_of

from slimkit.measure import ratio_ci
from slimkit.pipeline.runner import _changes, _comparison
from slimkit.report import plots as plots_module
from slimkit.report import render_html
from slimkit.report.fmt import speed_change


def test_speed_change_text() -> None:
    assert speed_change(3.1, [2.9, 3.3]) == ("3.10× faster [2.90–3.30]", "good")
    assert speed_change(0.8, [0.75, 0.85]) == ("1.25× slower [1.18–1.33]", "worse")
    # the "0.98x slower" / "p90 11.08x faster": inside the noise, it is no change
    assert speed_change(0.98, [0.9, 1.07]) == ("no change [0.90–1.07×]", "na")
    assert speed_change(11.08, [0.5, 20.0])[0] == "no change [0.50–20.00×]"
    assert speed_change(2.0) == ("2.00× faster", "good")  # an old report without interval
    assert speed_change(None, [1, 2]) == ("—", "na")


def _timed(old: list[float], new: list[float]) -> dict:
    return {"torch": {}, "onnxruntime": {"32": {"baseline": {"samples_ms": old},
                                               "final": {"samples_ms": new}}}}


@pytest.mark.parametrize("factor, verdict, shown", [
    (0.5, "faster", "2.00× faster ["), (1.0, "no difference", "no change ["),
    (1.25, "slower", "1.25× slower [")])
def test_interval_verdict_and_text_agree(factor: float, verdict: str, shown: str) -> None:
    old = [1.0 + 0.02 * ((7 * i) % 11) for i in range(30)]  # +-10% noise, deterministic
    wobble = [1.0 + 0.01 * ((5 * i) % 7 - 3) for i in range(30)]  # +-3%, centred on 1
    new = [o * factor * w for o, w in zip(old, wobble, strict=True)]
    change = _changes(_timed(old, new), ["baseline", "final"])["final"]["onnxruntime"]["32"]
    assert change["verdict"] == verdict
    ratio, lo, hi = ratio_ci(new, old)
    assert change["ci95"] == [lo, hi] and lo <= ratio <= hi
    base = {"size_bytes": 2, "onnx_size_bytes": 2,
            "latency": {"torch": {}, "onnxruntime": {"32": {"median_ms": 1.0}}}}
    final = {"size_bytes": 1, "onnx_size_bytes": 1,
             "latency": {"torch": {}, "onnxruntime": {"32": {"median_ms": factor}}}}
    entry = _comparison(base, final, {"onnxruntime": {"32": change}})["onnxruntime"]["32"]
    assert entry["speedup_ci95"] == [pytest.approx(1 / hi), pytest.approx(1 / lo)]
    assert entry["within_noise"] is (verdict == "no difference")
    assert speed_change(entry["speedup"], entry["speedup_ci95"])[0].startswith(shown)


def test_html_shows_every_interval_and_flags_the_slower_stage(
        sample_report: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots_module, "_to_data_uri", lambda fig: "data:image/png;base64,")
    cmp = sample_report["comparison"]
    cmp["onnxruntime"]["32"]["speedup_ci95"] = [1.52, 1.70]
    cmp["onnxruntime"]["1"]["speedup_ci95"] = [0.95, 1.9]
    sample_report["target"] = {"min_speedup": {"value": 1.5, "runtime": "onnxruntime",
                                               "batch": 32}}
    stage = sample_report["stages"][1]
    stage["latency_change"] = {"onnxruntime": {"1": {"time_ratio": 1.0, "ci95": [0.97, 1.04],
                                                     "verdict": "no difference"},
                                               "32": {"time_ratio": 1.5, "ci95": [1.4, 1.6],
                                                      "verdict": "slower"}}}
    stage["flags"] = ["stage 2 (magnitude_prune) made onnxruntime slower at batch 32: 1.50x "
                      "the time of the model before it (95% CI 1.40-1.60); time grew most in "
                      "fc1 (+0.2 ms)"]
    page = render_html(sample_report)
    compare = tables_of(page)["compare"]
    ort_at = next(i for i, r in enumerate(compare) if r[0] == "Latency, ONNX Runtime")
    assert compare[ort_at + 3] == ["batch 32, median", "0.740 ms", "0.459 ms",
                                   "1.61× faster [1.52–1.70]"]
    assert compare[ort_at + 1][3] == "no change [0.95–1.90×]"
    assert compare[ort_at + 2][0] == "batch 1, p90" and compare[ort_at + 2][3] == ""
    speed = row(tables_of(page)["stages"], "1")[7]
    assert "batch 1: no change [0.96–1.03×]" in speed
    assert "batch 32: 1.50× slower [1.40–1.60]" in speed and "time grew most in fc1" in speed
    assert "1.61× faster [1.52–1.70] (ONNX Runtime, batch 32)" in page  # the headline chip
    assert page.count("made onnxruntime slower at batch 32") == 2  # banner + stage row


def test_the_speed_criterion_carries_its_interval(sample_report: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from slimkit.cli_views import verdict_lines
    from slimkit.pipeline.recipe import load_recipe
    from slimkit.pipeline.verdict import judge

    monkeypatch.setattr(plots_module, "_to_data_uri", lambda fig: "data:image/png;base64,")
    target = load_recipe({"stages": [{"kind": "ptq"}], "target": {"min_speedup": {
        "value": 1.5, "runtime": "onnxruntime", "batch": 32}}}).target
    cmp = sample_report["comparison"]
    cmp["onnxruntime"]["32"]["speedup_ci95"] = [1.52, 1.70]
    verdict = judge(target, sample_report["baseline"], sample_report["final"], cmp)
    crit = verdict["criteria"][0]
    assert crit["met"] and crit["ci95"] == [1.52, 1.70]
    sample_report["verdict"] = verdict
    sample_report["parity"] = {"ok": True, "max_abs_diff": 1e-6, "atol": 1e-4}
    assert "[1.52–1.70]" in render_html(sample_report)
    assert "got 1.613 [95% CI 1.520-1.700]: [green]met" in "\n".join(
        verdict_lines(sample_report))
