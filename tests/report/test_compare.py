"""``slimkit compare``: two runs' report.json side by side, and an interleaved re-timing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.cli import main
from slimkit.core.errors import ConfigError
from slimkit.report.compare import compare_runs, load_run, time_runs


def _run(tmp: Path, name: str, report: dict, model: nn.Module | None = None) -> Path:
    out = tmp / name
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report))
    if model is not None:
        torch.onnx.export(model.eval(), (torch.randn(2, 64),), out / "model.onnx",
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}},
                          dynamo=False)
    return out


def _pair(sample_report: dict) -> tuple[dict, dict]:
    a, b = copy.deepcopy(sample_report), copy.deepcopy(sample_report)
    b["final"]["params"] = a["final"]["params"] // 2
    b["final"]["accuracy"]["top1"] = a["final"]["accuracy"]["top1"] - 0.01
    return a, b


def test_rows_hold_both_reports_values_and_the_better_one(sample_report, tmp_path):
    a, b = _pair(sample_report)
    result = compare_runs(load_run(_run(tmp_path, "a", a)), load_run(_run(tmp_path, "b", b)))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["params"]["a"] == a["final"]["params"]
    assert rows["params"]["b"] == b["final"]["params"]
    assert rows["params"]["ratio_b_to_a"] == pytest.approx(b["final"]["params"]
                                                           / a["final"]["params"])
    assert rows["params"]["winner"] == "B"  # fewer parameters is better
    assert rows["top1"]["winner"] == "A"  # higher accuracy is better
    assert rows["MACs / sample"]["winner"] == "same"
    lat = rows["latency onnxruntime b=32 (ms, separate runs)"]
    assert lat["a"] == a["final"]["latency"]["onnxruntime"]["32"]["median_ms"]
    assert any("not interleaved" in n for n in result["notes"])
    assert result["a"]["stages"] == [s["kind"] for s in a["recipe"]["stages"]]


def test_a_folder_without_a_report_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="'.*empty' holds no report.json"):
        load_run(tmp_path / "empty")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="is not a slimkit report \\(no model, baseline, final"):
        load_run(tmp_path / "other.json")


def test_cli_prints_json_and_exits_2_on_a_bad_run(sample_report, tmp_path, capsys):
    a, b = _pair(sample_report)
    ra, rb = _run(tmp_path, "a", a), _run(tmp_path, "b", b)
    assert main(["compare", str(ra), str(rb), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"][0]["name"] == "params"
    assert main(["compare", str(ra), str(tmp_path / "nope")]) == 2
    assert "holds no report.json" in capsys.readouterr().err


def test_time_finds_a_much_slower_model_slower_with_an_interval(sample_report, tmp_path):
    torch.manual_seed(0)
    fast = nn.Sequential(nn.Linear(64, 10))
    slow = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)], nn.Linear(64, 10))
    report = copy.deepcopy(sample_report)
    report["model"] = {"name": "mlp", "input_shape": [64], "input_dtype": "float32"}
    a = load_run(_run(tmp_path, "a", report, fast))
    b = load_run(_run(tmp_path, "b", report, slow))
    timed = time_runs(a, b, batch=32, repeats=15)
    low, high = timed["ci"]
    assert low <= timed["ratio_b_to_a"] <= high
    assert low > 1 and timed["verdict"].startswith("B ") and timed["verdict"].endswith("slower")


def test_time_refuses_runs_with_different_inputs(sample_report, tmp_path):
    ra = copy.deepcopy(sample_report)
    ra["model"] = {"name": "m", "input_shape": [64], "input_dtype": "float32"}
    rb = copy.deepcopy(ra)
    rb["model"]["input_shape"] = [32]
    a, b = load_run(_run(tmp_path, "a", ra)), load_run(_run(tmp_path, "b", rb))
    with pytest.raises(ConfigError, match="take different inputs"):
        time_runs(a, b)
