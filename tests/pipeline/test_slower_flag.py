"""A stage that makes ONNX Runtime slower is flagged, naming the layer whose time grew."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.record import Record
from slimkit.measure.latency import layer_growth, node_layer
from slimkit.pipeline import compress, load_recipe, register_stage


class SlowConfig(SlimConfig):
    kind: Literal["test_slow"] = "test_slow"


class Burdened(nn.Module):
    """The model plus a zero-weight branch: same outputs, a lot more work (two wide GEMMs)."""

    def __init__(self, inner: nn.Module, features: int, classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.burden = nn.Sequential(nn.Flatten(), nn.Linear(features, 2048), nn.ReLU(),
                                    nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, classes))
        with torch.no_grad():
            self.burden[-1].weight.zero_()
            self.burden[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.burden(x)


#: Off by default: registered stages are run by other tests (the stage contract).
SLOW = {"on": False}


@register_stage(SlowConfig)
def _slow(model, cfg, ctx):
    if not SLOW["on"]:
        return model.copy(), Record(changed=["nothing"])
    return model.copy(Burdened(model.copy().module, 64, 10)), Record(changed=["burden"])


def test_node_names_map_to_layers():
    layers = {"conv1", "layer1.0.conv1", "fc"}
    assert node_layer("/conv1/Conv_output_0_nchwc", layers) == "conv1"
    assert node_layer("/layer1/layer1.0/conv1/Conv", layers) == "layer1.0.conv1"
    assert node_layer("/fc/input_fq/QuantizeLinear", layers) == "fc"
    assert node_layer("/pool1/MaxPool", layers) == "pool1"  # a module without weights
    assert node_layer("ReorderOutput", layers) == "(ReorderOutput: added by ONNX Runtime)"
    grew = layer_growth({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 1.0, "c": 4.0})
    assert [(g["layer"], g["added_ms"]) for g in grew] == [("c", 4.0), ("a", 0.5)]


def test_a_stage_that_slows_onnxruntime_is_flagged_with_its_layers(mlp, digits,
                                                                  tmp_path: Path):
    recipe = load_recipe({"stages": [{"kind": "test_slow"}],
                          "measure": {"threads": 1, "batch_sizes": [8], "warmup": 2,
                                      "repeats": 12}})
    logged: list[str] = []
    SLOW["on"] = True
    try:
        report = compress(mlp, digits, recipe, tmp_path / "out", progress=False,
                          log=logged.append)
    finally:
        SLOW["on"] = False
    stage = report["stages"][0]
    change = stage["latency_change"]["onnxruntime"]["8"]
    assert change["verdict"] == "slower" and change["ci95"][0] > 1
    # the two 2048-wide GEMMs are the time that grew; the original layers barely moved
    grew = stage["slower_layers"]["8"]
    assert {g["layer"] for g in grew[:2]} == {"burden.1", "burden.3"}
    assert grew[0]["before_ms"] == 0.0 and grew[0]["added_ms"] > 0
    assert len(stage["flags"]) == 1 and "time grew most in burden." in stage["flags"][0]
    assert any(line.startswith("warning: stage 1 (test_slow) made onnxruntime slower")
               for line in logged)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["stages"][0]["slower_layers"]["8"][0]["layer"].startswith("burden.")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "made onnxruntime slower" in html and "burden.3" in html
