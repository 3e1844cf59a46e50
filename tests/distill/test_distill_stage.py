"""Distillation as a recipe stage, as the fine-tuning loss of pruning, and via an assistant."""

from pathlib import Path

import pytest
import torch
from tests._stages import stage_on

from slimkit.core.errors import ConfigError
from slimkit.distill.config import DistillConfig, LogitKD
from slimkit.distill.run import DistillStageConfig, FinetuneConfig, _distill, finetune
from slimkit.io.loader import load_zoo
from slimkit.pipeline import compress, load_recipe
from slimkit.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from slimkit.train import TrainConfig, evaluate

FAST = {"threads": 1, "batch_sizes": [1, 8], "warmup": 1, "repeats": 3}


def test_distill_stage_defaults_to_the_model_before_compression(mlp, digits, tmp_path: Path):
    recipe = load_recipe({"stages": [
        {"kind": "magnitude_prune", "sparsity": 0.9},
        {"kind": "distill", "train": {"epochs": 2, "lr": 1e-3},
         "loss": {"logits": {"temperature": 4, "alpha": 0.5}}},
    ], "measure": FAST})
    report = compress(mlp, digits, recipe, tmp_path / "o", progress=False, log=lambda s: None)
    stage = report["stages"][1]
    details = stage["details"]
    # Inside a run, stages measure on the validation split (the test split is the runner's).
    assert details["teacher_top1"] == pytest.approx(report["baseline"]["val_metrics"]["top1"])
    assert details["student_top1"] > details["student_top1_before"]
    assert details["student_train"]["steps"] > 0 and "distilled" in stage["changed"][0]


def test_prune_finetune_distils_from_the_unpruned_model(mlp, digits):
    cfg = MagnitudePruneConfig(sparsity=0.9, finetune=FinetuneConfig(
        epochs=1, lr=1e-3, distill=DistillConfig(logits=LogitKD(temperature=4, alpha=0.2))))
    pruned, rec = stage_on(magnitude_prune, mlp.module, cfg, data=digits)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned if hasattr(m, "weight"))
    total = sum(m.weight.numel() for m in pruned if hasattr(m, "weight"))
    assert zeros / total == pytest.approx(0.9, abs=1e-3)  # masks held during distillation
    assert rec.details["finetune"]["epochs"][0]["test_top1"] > 0.5
    recipe = load_recipe({"stages": [{"kind": "magnitude_prune", "sparsity": 0.5, "finetune": {
        "epochs": 1, "distill": {"logits": {"temperature": 2}}}}]})
    assert recipe.stages[0].finetune.distill.logits.temperature == 2


def test_teacher_assistant_chain(mlp, digits):
    student = load_zoo("lenet300", digits).module
    before = student.fc3.weight.detach().clone()
    cfg = DistillStageConfig(train=TrainConfig(epochs=1, lr=2e-3), assistant={
        "model": "zoo:lenet300", "train": {"epochs": 1, "lr": 2e-3}})
    assistant = load_zoo("lenet300", digits).module
    trained, rec = _distill(student, mlp.module, digits, cfg, assistant=assistant)
    assert rec.details["assistant_top1"] == pytest.approx(
        evaluate(assistant, digits.x_test, digits.y_test))
    assert rec.details["student_top1"] > 0.5
    assert len(rec.changed) == 2 and rec.changed[0].startswith("assistant zoo:lenet300")
    assert torch.equal(student.fc3.weight, before)  # the student passed in is left alone
    assert not torch.equal(trained.fc3.weight, before)


def test_finetune_without_teacher_is_refused(mlp, digits):
    cfg = FinetuneConfig(epochs=1, distill={"logits": {}})
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(mlp.module, digits, cfg, teacher=None)
