"""Factorized zoo models export to ONNX with parity; the ``lowrank`` stage runs in a recipe."""

from pathlib import Path

import pytest
import torch
from tests._stages import stage_on

from slimkit.core.errors import ConfigError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.lowrank import FACTORIZERS, LowRankConfig, lowrank
from slimkit.measure import count_params
from slimkit.measure.onnx_stats import onnx_stats
from slimkit.pipeline import STAGES, compress, load_recipe

FAST = {"threads": 1, "batch_sizes": [1, 4], "warmup": 1, "repeats": 2}


@pytest.mark.parametrize(("name", "conv"), [("lenet5", "cp"), ("resnet20", "tucker2"),
                                            ("resnet20", "spatial")])
def test_onnx_parity_of_a_factorized_zoo_model(name: str, conv: str, tmp_path: Path):
    torch.manual_seed(0)
    model = load_zoo(name, input_shape=(1, 8, 8), num_classes=10)
    cfg = LowRankConfig(conv=conv, rank="ratio", ratio=0.4, n_iter=15)
    small, rec = stage_on(lowrank, model.module, cfg, example_inputs=model.example_inputs(1))
    assert len(rec.details["layers"]) >= 3
    factorized = model.copy(small)
    factorized.arch = None
    path = export_onnx(factorized, tmp_path / "m.onnx")
    for batch in (1, 5):
        parity = check_parity(factorized, path, factorized.example_inputs(batch))
        assert parity["ok"] and parity["max_abs_diff"] < 1e-4
    assert onnx_stats(path)["params"] < count_params(model.module)["params"]


def test_lowrank_stage_in_a_recipe(mlp, digits, tmp_path: Path):
    assert "lowrank" in STAGES
    stage = {"kind": "lowrank", "rank": "ratio", "ratio": 0.3, "exclude": ["5"],
             "finetune": {"epochs": 1, "max_steps": 8, "lr": 3e-3}}
    recipe = load_recipe({"stages": [stage], "target": {"max_accuracy_drop": 50.0},
                          "measure": FAST})
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    report = compress(mlp, digits, recipe, tmp_path / "out", progress=False, log=lambda s: None)
    for k, v in mlp.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    entry = report["stages"][0]
    assert entry["kind"] == "lowrank" and set(entry["details"]["layers"]) == {"1", "3"}
    layer = entry["details"]["layers"]["1"]
    assert layer["rank"] == [int(0.3 * 64 * 128 / (64 + 128))]
    assert layer["flops_after"] < layer["flops_before"]
    assert report["final"]["params"] < report["baseline"]["params"]
    assert report["parity"]["ok"] and (tmp_path / "out" / "model.onnx").is_file()
    assert report["final"]["accuracy"]["top1"] > 0.5


def test_recipe_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"stages\.0\.energy"):
        load_recipe({"stages": [{"kind": "lowrank", "energy": 1.5}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.rnak: unknown key. Did you mean 'rank'"):
        load_recipe({"stages": [{"kind": "lowrank", "rnak": "vbmf"}]})


def test_factorized_zoo_model_drops_its_stale_spec():
    model = load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)
    small, _ = stage_on(lowrank, model.module, LowRankConfig(rank="ratio", include=["fc1"]))
    assert hasattr(model.module, "slimkit_spec") and not hasattr(small, "slimkit_spec")


def test_factorized_zoo_artifact_rebuilds_from_spec_and_plan(tmp_path: Path):
    from slimkit.io import load_artifact, save_artifact
    model = load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)
    out, rec = lowrank(model, LowRankConfig(rank="ratio", ratio=0.3, include=["fc1"]))
    small = out.module
    save_artifact(out, tmp_path / "a")
    assert not (tmp_path / "a" / "model.pt2").exists()
    back = load_artifact(tmp_path / "a")
    x = model.example_inputs(3)
    torch.testing.assert_close(back.module(*x), small.eval()(*x), rtol=0, atol=0)
    assert back.arch["transforms"][0] == {"kind": "lowrank", "version": 1,
                                          "plan": rec.details["plan"]}


@pytest.mark.parametrize("conv", FACTORIZERS.names())
def test_artifact_rebuild_is_structure_only_and_matches_the_factorized_model(
        conv: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Replaying the plan for an artifact builds the factorized structure without decomposing
    (so it also runs on the meta device): the same state_dict keys and shapes as the numeric
    path, and the loaded model gives the same outputs bit for bit."""
    from slimkit.io import load_artifact, save_artifact
    from slimkit.io.artifact import _build_zoo

    torch.manual_seed(0)
    model = load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)
    out, rec = lowrank(model, LowRankConfig(conv=conv, rank="ratio", ratio=0.3, n_iter=15))
    assert {e["method"] for e in rec.details["layers"].values()} >= {conv}
    expected = {k: tuple(v.shape) for k, v in out.module.state_dict().items()}
    save_artifact(out, tmp_path / "a")

    def no_decompose(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("an artifact rebuild must not decompose")

    for name in FACTORIZERS.names():
        monkeypatch.setattr(FACTORIZERS.get(name), "decompose", no_decompose)
    with torch.device("meta"):
        meta = _build_zoo(out.arch)
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == expected
    assert all(t.is_meta for t in meta.state_dict().values())
    real = _build_zoo(out.arch)
    assert {k: tuple(v.shape) for k, v in real.state_dict().items()} == expected
    assert repr(real) == repr(out.module)
    back = load_artifact(tmp_path / "a")
    x = model.example_inputs(3)
    torch.testing.assert_close(back.module(*x), out.module.eval()(*x), rtol=0, atol=0)


def test_artifact_refuses_a_transform_owned_outside_slimkit(tmp_path: Path):
    from slimkit.core.errors import ModelLoadError
    from slimkit.io.transforms import replay_transforms

    with pytest.raises(ModelLoadError, match="outside slimkit.s known rebuilders"):
        replay_transforms(torch.nn.Linear(2, 2), [{"kind": "x", "owner": "os", "plan": {}}])
