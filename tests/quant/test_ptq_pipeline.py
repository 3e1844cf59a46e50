"""The ``ptq`` stage inside a recipe: parity with ONNX Runtime, smaller ONNX, integer kernels."""

from pathlib import Path

import torch

from slimkit.io.artifact import load_artifact
from slimkit.pipeline import compress, load_recipe

FAST = {"threads": 1, "batch_sizes": [8], "warmup": 1, "repeats": 3}


def test_compress_mlp_with_a_ptq_stage(mlp, digits, tmp_path: Path):
    recipe = load_recipe({"stages": [{"kind": "ptq", "num_samples": 128}],
                          "target": {"max_accuracy_drop": 3.0}, "measure": FAST})
    report = compress(mlp, digits, recipe, tmp_path / "out", progress=False, log=lambda s: None)
    assert report["parity"]["ok"], report["parity"]
    assert report["comparison"]["onnx_size_ratio"] > 2.5  # 17k weights: scales + graph weigh in
    stage = report["stages"][0]
    ort_info = stage["details"]["ort_int8"]
    assert ort_info["all_int8"] and ort_info["op_counts"]["QGemm"] == 3
    assert report["verdict"]["met"]
    back = load_artifact(tmp_path / "out" / "model", template=mlp.module)
    x = digits.x_test[:16]
    with torch.no_grad():
        got = back.module(x)
    assert torch.isfinite(got).all() and got.shape == (16, 10)
