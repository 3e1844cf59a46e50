import json
from pathlib import Path
from typing import Literal

import pytest
import torch

from slimkit.core.config import SlimConfig
from slimkit.core.errors import DataError, ModelError, OutputExistsError, ResumeError
from slimkit.core.record import Record
from slimkit.io.artifact import load_artifact
from slimkit.pipeline import compress, load_recipe, register_stage

FAIL = {"boom": False}


class BoomConfig(SlimConfig):
    kind: Literal["test_boom"] = "test_boom"


class NanConfig(SlimConfig):
    kind: Literal["test_nan"] = "test_nan"


@register_stage(BoomConfig)
def _boom(model, cfg, ctx):
    if FAIL["boom"]:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
    return model.copy(), Record(changed=["nothing"])


@register_stage(NanConfig)
def _nan(model, cfg, ctx):
    model = model.copy()
    with torch.no_grad():
        next(model.module.parameters())[0] = float("nan")
    return model, Record()


FAST = {"threads": 1, "batch_sizes": [1, 8], "warmup": 1, "repeats": 3}


def _recipe(*stages, **target):
    return load_recipe({"stages": list(stages), "target": target, "measure": FAST})


PRUNE = {"kind": "magnitude_prune", "sparsity": 0.8, "finetune": {"epochs": 1, "lr": 1e-3}}


def test_compress_end_to_end(mlp, digits, tmp_path: Path):
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    recipe = _recipe(PRUNE, max_accuracy_drop=5.0, min_size_ratio=2.0)
    report = compress(mlp, digits, recipe, tmp_path / "out", keep_checkpoints=True,
                      progress=False, log=lambda s: None)
    out = tmp_path / "out"
    for name in ("report.json", "report.html", "model.onnx", "model/manifest.json"):
        assert (out / name).is_file(), name
    # The user's model is untouched.
    for k, v in mlp.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    base, final = report["baseline"], report["final"]
    assert final["nonzero_params"] < 0.3 * base["nonzero_params"]
    assert final["params"] == base["params"]
    assert report["comparison"]["size_ratio"] == pytest.approx(
        base["size_bytes"] / final["size_bytes"])
    assert report["comparison"]["size_ratio"] > 2.0
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4
    assert set(report["comparison"]["onnxruntime"]) == {"1", "8"}
    assert report["stages"][0]["kind"] == "magnitude_prune"
    assert report["stages"][0]["measure"]["latency"]["torch"]["1"]["median_ms"] > 0
    drop = 100 * (base["accuracy"]["top1"] - final["accuracy"]["top1"])
    crit = {c["name"]: c for c in report["verdict"]["criteria"]}
    assert crit["max_accuracy_drop"]["achieved"] == pytest.approx(drop)
    assert report["verdict"]["met"] == (drop <= 5.0)
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdict"] == report["verdict"]
    # The saved artifact reproduces the final model and records its history.
    art = load_artifact(out / "model", template=mlp.module)
    assert art.history[-1]["kind"] == "magnitude_prune" and art.recipe["stages"]
    x = digits.x_test[:16]
    torch.testing.assert_close(art.module(x), load_artifact(
        out / ".slimkit-run" / "stage-00", template=mlp.module).module(x))
    assert report["environment"]["threads"] == 1 and report["environment"]["torch"]


def test_missed_target_still_writes_everything(mlp, digits, tmp_path: Path):
    recipe = _recipe({"kind": "magnitude_prune", "sparsity": 0.3},
                     min_speedup={"value": 50.0, "batch": 8})
    report = compress(mlp, digits, recipe, tmp_path / "o", progress=False, log=lambda s: None)
    assert report["verdict"]["met"] is False
    crit = report["verdict"]["criteria"][0]
    assert crit["margin"] < 0 and crit["achieved"] == pytest.approx(
        report["comparison"]["onnxruntime"]["8"]["speedup"])
    assert (tmp_path / "o" / "model" / "weights.safetensors").is_file()
    assert (tmp_path / "o" / "report.html").is_file()


def test_interrupted_run_resumes_and_matches_uninterrupted(mlp, digits, tmp_path: Path):
    recipe = _recipe(PRUNE, {"kind": "test_boom"})
    logs: list[str] = []
    FAIL["boom"] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            compress(mlp, digits, recipe, tmp_path / "r", progress=False, log=logs.append)
    finally:
        FAIL["boom"] = False
    state = json.loads((tmp_path / "r" / ".slimkit-run" / "state.json").read_text())
    assert [s["kind"] for s in state["stages"]] == ["magnitude_prune"]
    with pytest.raises(OutputExistsError, match="--resume"):
        compress(mlp, digits, recipe, tmp_path / "r", progress=False, log=logs.append)
    logs.clear()
    resumed = compress(mlp, digits, recipe, tmp_path / "r", resume=True, keep_checkpoints=True,
                       progress=False,
                       log=logs.append)
    assert any("finished in an earlier run" in line for line in logs)
    assert not any(line.startswith("stage 1/2") for line in logs)
    compress(mlp, digits, recipe, tmp_path / "s", progress=False, log=lambda s: None)
    assert [s["kind"] for s in resumed["stages"]] == ["magnitude_prune", "test_boom"]
    a = load_artifact(tmp_path / "r" / "model", template=mlp.module).module.state_dict()
    b = load_artifact(tmp_path / "s" / "model", template=mlp.module).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    other = _recipe({"kind": "magnitude_prune", "sparsity": 0.5})
    with pytest.raises(ResumeError, match="different model, data or recipe"):
        compress(mlp, digits, other, tmp_path / "r", resume=True, progress=False)


def test_nan_after_a_stage_is_caught(mlp, digits, tmp_path: Path):
    with pytest.raises(ModelError, match=r"stage 1 \(test_nan\): parameter '1.weight'"):
        compress(mlp, digits, _recipe({"kind": "test_nan"}), tmp_path / "n", progress=False,
                 log=lambda s: None)


def test_data_that_does_not_fit_the_model(mlp, digits, tmp_path: Path):
    from dataclasses import replace

    wide = replace(digits, x_train=torch.zeros(10, 1, 28, 28), x_test=torch.zeros(10, 1, 28, 28))
    with pytest.raises(DataError, match=r"shape \(1, 28, 28\) but model 'mlp' takes \(1, 8, 8\)"):
        compress(mlp, wide, _recipe(PRUNE), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_overwrite_and_resume_never_touch_foreign_directories(mlp, digits, tmp_path: Path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"precious")
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputExistsError, match="not a slimkit run directory"):
            compress(mlp, digits, _recipe(PRUNE), foreign, progress=False, **flags)
    assert (foreign / "cat.jpg").read_bytes() == b"precious"
    from slimkit.io.artifact import save_artifact

    art = save_artifact(mlp, tmp_path / "art")
    model = load_artifact(art)
    with pytest.raises(OutputExistsError, match="would hold or replace the input model"):
        compress(model, digits, _recipe(PRUNE), art, overwrite=True, progress=False)
    assert (art / "manifest.json").is_file()


def test_stages_compose_after_a_structural_change(mlp, digits, tmp_path: Path):
    recipe = _recipe({"kind": "lowrank", "linear": "svd", "rank": "ratio", "ratio": 0.5,
                      "margin": 0.0}, {"kind": "magnitude_prune", "sparsity": 0.5})
    report = compress(mlp, digits, recipe, tmp_path / "c", progress=False, log=lambda s: None)
    assert [s["kind"] for s in report["stages"]] == ["lowrank", "magnitude_prune"]
    assert report["stages"][1]["changed"], "pruning found the factorized Linear layers"
    assert report["final"]["params"] < report["baseline"]["params"]
    assert report["parity"]["ok"]


def test_a_failed_final_export_still_writes_the_report_and_misses_the_target(
        mlp, digits, tmp_path: Path, monkeypatch):
    from slimkit.core.errors import ExportError
    from slimkit.pipeline import runner

    real = runner.export_onnx

    def export(model, path):
        if Path(path).name == "model.onnx":
            raise ExportError("ONNX export of 'mlp' failed: unsupported op 'aten::frobnicate'")
        return real(model, path)

    monkeypatch.setattr(runner, "export_onnx", export)
    recipe = load_recipe({"stages": [{"kind": "test_boom"}], "measure": FAST,
                          "target": {"max_accuracy_drop": 5.0}})
    logs = []
    report = compress(mlp, digits, recipe, tmp_path / "out", progress=False, log=logs.append)
    assert report["verdict"]["met"] is False
    failed = [c for c in report["verdict"]["criteria"] if c["name"] == "onnx_export"]
    assert failed and "frobnicate" in failed[0]["note"]
    assert report["parity"]["ok"] is False and report["final"]["onnx_size_bytes"] is None
    assert report["final"]["latency"]["onnxruntime"] == {}
    assert report["final"]["latency"]["torch"]["1"]["median_ms"] > 0
    assert any("frobnicate" in line for line in logs)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["export_errors"]["final"].endswith("'aten::frobnicate'")
    assert (tmp_path / "out" / "report.html").is_file()
