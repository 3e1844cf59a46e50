"""Early exits composed with pruning and quantization, the target the thresholds follow, and
the report section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from slimkit.core.stages import STAGES, StageContext
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel, exit_index
from slimkit.exit.onnx import check_exit_parity, export_exit_onnx
from slimkit.exit.stage import allowed_drop
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.pipeline.recipe import load_recipe
from slimkit.report.exits import early_exit_section
from slimkit.report.page import render_html

RECIPE = """
version: 1
target: {max_accuracy_drop: 3.0}
stages:
  - {kind: structured_prune, ratio: 0.25}
  - {kind: early_exit, latency_samples: 0, margin: none,
     train: {epochs: 2, batch_size: 32, lr: 0.01}}
  - {kind: ptq, num_samples: 32}
"""


def test_one_recipe_prunes_adds_exits_and_quantizes(trained_resnet, tmp_path: Path):
    model, data = trained_resnet
    recipe = load_recipe(RECIPE)
    ctx = StageContext(data=data, progress=False, teacher=model,
                       extras={"target": recipe.target})
    cur = model.copy()
    records, models = [], []
    for cfg in recipe.stages:
        cur, record = STAGES.get(cfg.kind).apply(cur, cfg, ctx)
        records.append(record)
        models.append(cur)
    ee = cur.module
    assert isinstance(ee, EarlyExitModel)
    # The exits get what the pruning left of the recipe's 3 points, on the calibration split.
    from slimkit.data.split import split_indices

    cal = torch.from_numpy(split_indices(data.y_train, 0.2, seed=0)[1])
    with torch.no_grad():
        before, after = (float((m.module(data.x_train[cal]).argmax(1) == data.y_train[cal])
                               .double().mean()) for m in (model, models[0]))
    spent = records[1].details["drop_spent_before"]
    assert spent == pytest.approx(max(0.0, 100 * (before - after)), abs=1e-9)
    assert records[1].details["max_drop"] == pytest.approx(max(0.0, 3.0 - spent), abs=1e-12)
    assert records[1].details["max_drop_from"] == "target max_accuracy_drop"
    # The exits sit on the pruned backbone as it was; ptq quantized the exit heads too.
    pruned = {k: v.shape for k, v in models[0].module.state_dict().items()}
    assert pruned != {k: v.shape for k, v in model.module.state_dict().items()}
    assert {k: v.shape for k, v in models[1].module.backbone.state_dict().items()} == pruned
    assert any(line.startswith("heads.") for line in records[2].changed)
    x = data.x_test
    save_artifact(cur, tmp_path / "artifact")
    back = load_artifact(tmp_path / "artifact")
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), ee(x), rtol=0, atol=0)
    assert check_parity(cur, export_onnx(cur, tmp_path / "model.onnx"), x[:16])["ok"]
    export_exit_onnx(cur, tmp_path / "chain")
    parity = check_exit_parity(cur, tmp_path / "chain", x, atol=1e-3)
    assert parity["ok"], parity


def test_the_allowed_drop_comes_from_the_config_then_the_target():
    recipe = load_recipe("version: 1\ntarget: {max_metric_drop: {top1: 0.004}}\n"
                         "stages: [{kind: early_exit}]")
    ctx = StageContext(extras={"target": recipe.target})
    assert allowed_drop(EarlyExitConfig(), ctx) == (0.4, "target max_metric_drop.top1")
    assert allowed_drop(EarlyExitConfig(max_drop=1.5), ctx) == (1.5, "config max_drop")
    assert allowed_drop(EarlyExitConfig(), StageContext()) == (0.5, "default")


def test_the_report_section_shows_the_recorded_exits(trained_resnet):
    model, data = trained_resnet
    cfg = EarlyExitConfig.model_validate({"max_drop": 5.0, "latency_samples": 8, "margin": "none",
                                          "train": {"epochs": 2, "batch_size": 32}})
    out, record = STAGES.get("early_exit").apply(model.copy(), cfg,
                                                StageContext(data=data, progress=False))
    report = {"stages": [{"kind": "early_exit", **record.to_dict()}]}
    html = early_exit_section(report)
    test = record.details["test"]
    with torch.no_grad():
        where = exit_index(out.module, data.x_test)
    blocks = [e["block"] for e in record.details["exits"]]
    shares = torch.bincount(where, minlength=len(blocks) + 1).double() / len(where)
    cells = re.findall(r"<tr><td>([^<]*)</td><td>[^<]*</td><td>([0-9.]+)%</td>", html)
    assert blocks and [c[0] for c in cells] == [*blocks, "final head"]
    assert [float(c[1]) for c in cells] == [round(100 * float(s), 2) for s in shares]
    assert f"{100 * test['top1']:.2f}%" in html
    lat = record.details["latency"]
    assert lat["split"] == "test" and lat["samples"] == 8
    assert f"{lat['mean_ms']:.3f} ms" in html and "data:image/png;base64," in html
    assert 'id="early-exit"' in render_html(report)
    margin = record.details["margin"]
    assert f"drop there {margin['val_drop']:.2f} points (no safety margin)" in html
    held = {**record.details, "margin": {**margin, "level": 0.95, "val_drop_bound": 1.234,
                                         "method": "Newcombe paired (method 10)"}}
    assert ("its one-sided 95% upper bound 1.23 points (Newcombe paired (method 10)) kept "
            "within the target") in early_exit_section(
        {"stages": [{"kind": "early_exit", **record.to_dict(), "details": held}]})
    assert early_exit_section({"stages": [{"kind": "ptq", "details": {}}]}) == ""


def test_compress_ships_the_chain_that_stops(trained_resnet, tmp_path: Path):
    """A compress run of an early-exit recipe writes OUT/exits (steps + runner), checked exit
    by exit against PyTorch, beside model.onnx."""
    import json

    from slimkit.exit.runner import EarlyExitRunner
    from slimkit.pipeline import compress

    model, data = trained_resnet
    recipe = load_recipe("""
version: 1
target: {max_accuracy_drop: 3.0}
stages:
  - {kind: early_exit, latency_samples: 0, margin: none,
     train: {epochs: 1, batch_size: 32, lr: 0.01}}
measure: {batch_sizes: [1, 4], repeats: 2, warmup: 1}
""")
    report = compress(model, data, recipe, tmp_path / "out", progress=False, log=lambda s: None)
    assert isinstance(load_artifact(tmp_path / "out" / "model").module, EarlyExitModel)
    assert report["outputs"]["exits"] == str(tmp_path / "out" / "exits")
    assert report["exit_parity"]["ok"] and report["exit_parity"]["same_exits"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["exit_parity"] == report["exit_parity"]
    runner = EarlyExitRunner(tmp_path / "out" / "exits")
    out, where = runner.run({runner.input_names[0]: data.x_test[:8].numpy()})
    ee = load_artifact(tmp_path / "out" / "model").module
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(where), exit_index(ee, data.x_test[:8]))
        torch.testing.assert_close(torch.from_numpy(out), ee(data.x_test[:8]), rtol=0,
                                   atol=1e-4)
