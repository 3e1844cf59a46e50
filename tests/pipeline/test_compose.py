"""The mission's recipe end to end: structured pruning -> distillation -> INT8 PTQ -> ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimkit.io import load_artifact
from slimkit.io.loader import load_zoo
from slimkit.measure.latency import ort_session
from slimkit.pipeline import compress, load_recipe
from slimkit.train import TrainConfig, fit


def test_prune_distill_quantize_export_composes_and_the_artifact_rebuilds(digits,
                                                                          tmp_path: Path):
    torch.manual_seed(0)
    model = load_zoo("lenet5", digits)
    fit(model.module, digits, TrainConfig(epochs=2, lr=3e-3), progress=False)
    recipe = load_recipe({
        "stages": [{"kind": "structured_prune", "ratio": 0.4},
                   {"kind": "distill", "train": {"epochs": 1, "max_steps": 10, "lr": 5e-4}},
                   {"kind": "ptq", "calibration": "minmax", "num_samples": 128}],
        "measure": {"threads": 1, "batch_sizes": [1], "warmup": 1, "repeats": 2}})
    report = compress(model, digits, recipe, tmp_path / "out", progress=False,
                      log=lambda s: None)
    assert [s["kind"] for s in report["stages"]] == ["structured_prune", "distill", "ptq"]
    assert report["export_errors"] == {} and report["parity"]["ok"]
    assert report["final"]["params"] < 0.7 * report["baseline"]["params"]
    assert report["comparison"]["onnx_size_ratio"] > 4.0  # fewer channels and int8 weights
    assert report["comparison"]["size_ratio"] > 4.0
    # the artifact rebuilds zoo spec + pruning plan + BN folding + quantized layers, and
    # computes what ONNX Runtime computes from model.onnx
    back = load_artifact(tmp_path / "out" / "model")
    x = digits.x_test[:32]
    with torch.no_grad():
        ours = back.module(x).numpy()
    ort = ort_session(tmp_path / "out" / "model.onnx", 1).run(None, {"input": x.numpy()})[0]
    assert np.mean(ours.argmax(1) == ort.argmax(1)) >= 0.95
    assert np.abs(ours - ort).max() <= 2.5 * report["parity"]["quant_step"]
