"""The stage contract's one place: context defaults, type checks, transforms by kind+version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ConfigError, ModelLoadError
from slimkit.core.record import Record
from slimkit.core.registry import Registry
from slimkit.core.stages import STAGES, StageContext, commit_transforms
from slimkit.io.artifact import MANIFEST, load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.lowrank import LowRankConfig, lowrank
from slimkit.prune import MagnitudePruneConfig, magnitude_prune


def _lenet():
    torch.manual_seed(0)
    return load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)


def test_registry_imports_its_plugins_on_first_lookup_only():
    reg: Registry[int] = Registry("thing", plugins=["json"])
    assert not reg._loaded
    reg.register("a", 1)
    assert reg.names() == ["a"] and reg._loaded


def test_stage_without_context_uses_no_data_and_the_input_as_teacher():
    model = _lenet()
    out, rec = magnitude_prune(model, MagnitudePruneConfig(sparsity=0.5))
    assert rec.details["layers"] and out.module is not model.module
    assert STAGES.get("magnitude_prune").apply is magnitude_prune
    with pytest.raises(ConfigError, match="finetune needs data"):
        magnitude_prune(model, MagnitudePruneConfig(sparsity=0.5, finetune={"epochs": 1}))


def test_stage_refuses_a_wrong_config_or_a_bare_module():
    model = _lenet()
    with pytest.raises(ConfigError, match="stage magnitude_prune takes a MagnitudePruneConfig, "
                                          "got LowRankConfig"):
        magnitude_prune(model, LowRankConfig())
    with pytest.raises(ConfigError, match=r"takes a SlimModel, got LeNet5.*slimkit\.wrap"):
        magnitude_prune(model.module, MagnitudePruneConfig(sparsity=0.5))


def test_structural_change_is_stored_once_by_kind_and_version():
    model = _lenet()
    out, rec = lowrank(model, LowRankConfig(rank="ratio", ratio=0.3, include=["fc1"]),
                       StageContext(progress=False))
    assert out.arch["transforms"] == [{"kind": "lowrank", "version": 1,
                                       "plan": rec.details["plan"]}]
    assert "transforms" not in model.arch  # the input's spec is untouched
    assert not hasattr(out.module, "slimkit_spec") and hasattr(model.module, "slimkit_spec")
    assert "transforms" not in rec.to_dict()  # reports keep the plan in details only
    same, _ = magnitude_prune(model, MagnitudePruneConfig(sparsity=0.5))
    assert "transforms" not in same.arch and hasattr(same.module, "slimkit_spec")


def test_commit_without_a_rebuildable_spec_keeps_arch_none():
    model = _lenet()
    model.arch = None
    commit_transforms(model, Record(transforms=[("lowrank", {"layers": {}})]))
    assert model.arch is None and not hasattr(model.module, "slimkit_spec")


def _factorized_artifact(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    model = _lenet()
    out, _ = lowrank(model, LowRankConfig(rank="ratio", ratio=0.3, include=["fc1"]))
    save_artifact(out, tmp_path / "a")
    x = model.example_inputs(3)[0]
    return tmp_path / "a", x, out.module.eval()(x)


def _rewrite(path: Path, transform: dict) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["architecture"]["transforms"] = [transform]
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_artifacts_written_with_a_module_path_still_load(tmp_path: Path):
    path, x, expected = _factorized_artifact(tmp_path)
    plan = json.loads((path / MANIFEST).read_text())["architecture"]["transforms"][0]["plan"]
    _rewrite(path, {"kind": "lowrank", "owner": "slimkit.lowrank.plan", "plan": plan})
    torch.testing.assert_close(load_artifact(path).module(x), expected, rtol=0, atol=0)


def test_a_newer_transform_version_or_a_foreign_owner_is_refused(tmp_path: Path):
    path, _, _ = _factorized_artifact(tmp_path)
    plan = json.loads((path / MANIFEST).read_text())["architecture"]["transforms"][0]["plan"]
    _rewrite(path, {"kind": "lowrank", "version": 2, "plan": plan})
    with pytest.raises(ModelLoadError, match="'lowrank' is version 2; this slimkit reads up "
                                             "to 1: upgrade slimkit"):
        load_artifact(path)
    _rewrite(path, {"kind": "lowrank", "owner": "os", "plan": plan})
    with pytest.raises(ModelLoadError, match="names module 'os' outside slimkit"):
        load_artifact(path)
    _rewrite(path, {"kind": "no_such", "version": 1, "plan": plan})
    with pytest.raises(ModelLoadError, match="cannot replay artifact transform 'no_such'"):
        load_artifact(path)
