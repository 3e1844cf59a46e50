"""report.html of real runs, as headless Chromium shows it, against the run's report.json.

Two small runs (structured pruning; INT8 PTQ) on real data: every number the browser shows
in the baseline-vs-final table and the verdict must be the one report.json holds.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

import slimkit

from .test_report_chromium import CHROMIUM, _chromium

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")

MEASURE = {"batch_sizes": [1, 8], "repeats": 3, "warmup": 1}
RUNS = {
    "pruned": [{"kind": "structured_prune", "ratio": 0.5}],
    "quantized": [{"kind": "ptq"}],
}


def _cells(dom: str) -> dict[str, list[str]]:
    """The visible cells of the baseline-vs-final table, keyed by the row label; latency rows
    keyed ``<runtime>|batch N, median``."""
    table = re.search(r'<table class="compare">(.*?)</table>', dom, flags=re.S).group(1)
    rows, group = {}, ""
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, flags=re.S):
        cells = [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", c)).split())
                 for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, flags=re.S)]
        if len(cells) == 1:  # a group header: "Latency, ONNX Runtime"
            group = cells[0]
        elif cells:
            rows[f"{group}|{cells[0]}" if cells[0].startswith("batch") else cells[0]] = cells[1:]
    return rows


def _number(text: str) -> float:
    return float(re.match(r"[-\d.,]+", text).group(0).replace(",", ""))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_mlp_state, digits) -> dict[str, Path]:
    from tests.conftest import make_mlp

    out = {}
    for name, stages in RUNS.items():
        net = make_mlp()
        net.load_state_dict(trained_mlp_state)
        path = tmp_path_factory.mktemp(name) / "run"
        slimkit.compress(net.eval(), digits, {"stages": stages, "measure": MEASURE,
                                              "target": {"max_accuracy_drop": 5,
                                                         "min_size_ratio": 1.5}},
                         path, progress=False, log=lambda s: None)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_the_browser_shows_report_json_numbers(runs, name, tmp_path):
    report = json.loads((runs[name] / "report.json").read_text())
    result = _chromium(["--dump-dom"], tmp_path / "profile", runs[name] / "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _cells(result.stdout)
    base, final = report["baseline"], report["final"]
    assert [_number(c) for c in rows["Parameters"][:2]] == [base["params"], final["params"]]
    for label, key in (("Top-1 accuracy", "top1"), ("Top-5 accuracy", "top5")):
        shown = [_number(c) for c in rows[label][:2]]
        assert shown == [round(100 * base["accuracy"][key], 2),
                         round(100 * final["accuracy"][key], 2)]
    latency_rows = [k for k in rows if k.endswith("median")]
    assert len(latency_rows) == 2 * len(MEASURE["batch_sizes"])  # torch and ONNX Runtime
    for key in latency_rows:
        runtime = "onnxruntime" if "ONNX" in key else "torch"
        batch = re.search(r"batch (\d+)", key).group(1)
        for cell, measure in zip(rows[key][:2], (base, final), strict=True):
            assert _number(cell) == pytest.approx(measure["latency"][runtime][batch]["median_ms"],
                                                  abs=0.0051, rel=0.005)
    text = " ".join(re.sub(r"<[^>]+>", " ", result.stdout).split())
    assert ("Target MET" in text) == report["verdict"]["met"]
    assert ("Target MISSED" in text) == (not report["verdict"]["met"])


def test_quantized_run_counts_every_weight_and_its_bits(runs):
    """INT8 weights are parameters too (the 1503x-smaller bug): PTQ alone keeps the count."""
    report = json.loads((runs["quantized"] / "report.json").read_text())
    assert report["final"]["params"] == report["baseline"]["params"]
    assert report["final"]["bits_per_param"] < 10
    pruned = json.loads((runs["pruned"] / "report.json").read_text())
    assert pruned["final"]["params"] < pruned["baseline"]["params"]
