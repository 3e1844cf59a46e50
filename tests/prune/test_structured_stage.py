"""The ``structured_prune`` stage: recipes, the runner's ONNX parity, artifact round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests._stages import stage_on

from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.pipeline import compress, load_recipe
from slimkit.prune.structured import StructuredPruneConfig, structured_prune

FAST = {"threads": 1, "batch_sizes": [1], "warmup": 1, "repeats": 2}


def test_recipe_on_the_mlp_shrinks_it_and_exports(mlp, digits, tmp_path: Path):
    recipe = load_recipe({"stages": [{"kind": "structured_prune", "ratio": 0.5,
                                      "criterion": "taylor", "calib_batches": 2,
                                      "finetune": {"epochs": 1, "lr": 1e-3}}],
                          "measure": FAST})
    report = compress(mlp, digits, recipe, tmp_path / "out", progress=False,
                      log=lambda s: None)
    assert report["final"]["params"] < 0.6 * report["baseline"]["params"]
    assert report["parity"]["ok"]
    assert report["final"]["accuracy"]["top1"] > 0.8
    stage = report["stages"][0]
    assert stage["kind"] == "structured_prune" and stage["changed"]


def test_recipe_on_a_zoo_convnet_rebuilds_from_spec_and_plan(digits, tmp_path: Path):
    model = load_zoo("lenet5", digits)
    recipe = load_recipe({"stages": [{"kind": "structured_prune", "target": {"flops": 0.5},
                                      "round_to": 2}], "measure": FAST})
    report = compress(model, digits, recipe, tmp_path / "out", progress=False,
                      log=lambda s: None)
    assert report["parity"]["ok"]
    target = report["stages"][0]["details"]["target"]
    art = load_artifact(tmp_path / "out" / "model")
    assert art.arch["transforms"][0]["kind"] == "structured_prune"
    assert art.module.conv1.out_channels < 20
    assert target["reached"] and target["achieved"] <= 0.5


@pytest.mark.parametrize("name,kw,blocks", [
    ("resnet20", {}, 0.0), ("vit", {"dim": 32, "depth": 1}, 0.0),
    ("resnet20", {}, 0.5), ("vit", {"dim": 32, "depth": 2}, 0.5),  # residual branches go too
])
def test_artifact_round_trip_gives_identical_outputs(name: str, kw: dict, blocks: float,
                                                     tmp_path: Path):
    model = load_zoo(name, input_shape=(3, 8, 8), num_classes=10, **kw)
    x = model.example_inputs(3)
    out, rec = structured_prune(model, StructuredPruneConfig(ratio=0.4, blocks=blocks))
    small = out.module
    assert len(rec.details["plans"][0]["blocks"]) == round(blocks * (7 if name == "resnet20"
                                                                      else 4))
    save_artifact(out, tmp_path / "a")
    assert not (tmp_path / "a" / "model.pt2").exists()
    back = load_artifact(tmp_path / "a")
    torch.testing.assert_close(back.module(*x), small.eval()(*x), rtol=0, atol=0)
    assert sum(p.numel() for p in back.module.parameters()) == rec.details["params"]["after"]


def test_recipe_errors_name_the_key():
    from slimkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\.0\.criterion.*Did you mean 'fpgm'"):
        load_recipe({"stages": [{"kind": "structured_prune", "ratio": 0.3,
                                 "criterion": "fgpm"}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.ratio"):
        load_recipe({"stages": [{"kind": "structured_prune", "ratio": 1.3}]})


def test_distilled_finetune_recovers_accuracy(mlp, digits):
    def top1(m):
        with torch.no_grad():
            return float((m.eval()(digits.x_test).argmax(1) == digits.y_test).float().mean())

    plain, plain_rec = stage_on(structured_prune, mlp.module, StructuredPruneConfig(ratio=0.6),
                                data=digits)
    cfg = StructuredPruneConfig(ratio=0.6, finetune={"epochs": 2, "lr": 3e-3, "distill": {}})
    tuned, rec = stage_on(structured_prune, mlp.module, cfg, data=digits)
    assert len(rec.details["finetune"]) == 1 and "finetune" not in plain_rec.details
    assert top1(tuned) > max(0.75, top1(plain) + 0.1)
    assert sum(p.numel() for p in tuned.parameters()) == rec.details["params"]["after"]
