"""TensorBoard tracking: what is logged reads back from the event files, and nothing is
logged (or imported) when tracking is off."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimkit.core import tracking as T
from slimkit.core.errors import ConfigError

pytest.importorskip("tensorboard")


def _read(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_and_text_read_back_from_the_event_files(tmp_path: Path):
    with T.tracking("tensorboard", tmp_path):
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            T.log_scalars("train/finetune", {"loss": loss, "lr": 1e-3}, step)
        T.log_scalars("final", {"accuracy": {"top1": 0.97}, "met": True, "name": "x",
                                "nan": float("nan")})
        T.log_text("stage/ptq", {"changed": ["fc1 int8"]})
    acc = _read(tmp_path / T.FOLDER)
    loss = acc.Scalars("train/finetune/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([0.9, 0.5, 0.25])
    assert acc.Scalars("final/accuracy/top1")[0].value == pytest.approx(0.97)
    assert sorted(acc.Tags()["scalars"]) == ["final/accuracy/top1", "train/finetune/loss",
                                             "train/finetune/lr"]  # no bool, str or NaN
    text = acc.Tensors("stage/ptq/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"fc1 int8"' in text


def test_off_logs_nothing_and_unknown_kinds_are_refused(tmp_path: Path):
    with T.tracking(None, tmp_path) as tracker:
        assert tracker is None and not T.active()
        T.log_scalars("x", {"a": 1.0})  # a no-op
    assert not (tmp_path / T.FOLDER).exists()
    with pytest.raises(ConfigError, match="track='wandb': slimkit tracks to tensorboard"), \
            T.tracking("wandb", tmp_path):
        pass


def test_flat_numbers_keeps_finite_numbers_by_path():
    assert T.flat_numbers({"a": 1, "b": {"c": 2.5, "d": "no", "e": True},
                           "f": float("inf")}) == {"a": 1.0, "b/c": 2.5}


def test_a_compress_run_tracks_training_stages_and_final_metrics(digits, mlp, tmp_path: Path):
    import slimkit

    recipe = {"stages": [{"kind": "magnitude_prune", "sparsity": 0.5,
                          "finetune": {"epochs": 1}}],
              "measure": {"batch_sizes": [1, 4], "repeats": 2, "warmup": 1}}
    report = slimkit.compress(mlp.module, digits, recipe, tmp_path / "o", progress=False,
                              log=lambda s: None, track="tensorboard")
    acc = _read(tmp_path / "o" / T.FOLDER)
    tags = acc.Tags()["scalars"]
    losses = [t for t in tags if t.startswith("stage-00-magnitude_prune/train/")
              and t.endswith("/loss")]
    assert len(losses) == 1 and len(acc.Scalars(losses[0])) == report["stages"][0][
        "details"]["finetune"]["steps"]
    assert acc.Scalars("final/params")[0].value == report["final"]["params"]
    assert acc.Scalars("final/accuracy/top1")[0].value == pytest.approx(
        report["final"]["accuracy"]["top1"])
    assert acc.Scalars("verdict/met")[0].value == int(report["verdict"]["met"])
    assert acc.Scalars("stages/seconds")[0].value == pytest.approx(report["stages"][0]["seconds"])
    assert "stages/00-magnitude_prune/text_summary" in acc.Tags()["tensors"]
