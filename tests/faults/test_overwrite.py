"""``--overwrite`` builds the new run beside the old output and swaps it in only on success;
nothing slimkit did not write is ever deleted (issue 16, items 3 and 8)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
from tests.faults._job import MEASURE, build

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ModelError, OutputExistsError
from slimkit.core.record import Record
from slimkit.io.artifact import load_artifact
from slimkit.pipeline import compress, load_recipe, register_stage


class PoisonConfig(SlimConfig):
    kind: Literal["faults_poison"] = "faults_poison"
    how: Literal["nan", "interrupt"] = "nan"


@register_stage(PoisonConfig)
def _poison(model, cfg, ctx):
    if cfg.how == "interrupt":
        raise KeyboardInterrupt  # Ctrl-C during the stage
    model = model.copy()
    with torch.no_grad():
        next(model.module.parameters())[0] = float("nan")
    return model, Record()


def _recipe(*stages: dict):
    return load_recipe({"stages": list(stages), "measure": MEASURE})


PRUNE = {"kind": "magnitude_prune", "sparsity": 0.5}


def _compress(out: Path, recipe, logs: list[str] | None = None, **flags) -> dict:
    """A run that keeps its checkpoints (these tests look into them; that a run removes them
    after success is tested in tests/test_cli.py)."""
    flags.setdefault("keep_checkpoints", True)
    model, data, _ = build()
    return compress(model, data, recipe, out, progress=False,
                    log=(logs.append if logs is not None else lambda s: None), **flags)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    _compress(out, _recipe(PRUNE))
    return out


@pytest.fixture
def previous(finished: Path, tmp_path: Path) -> Path:
    """A finished run's output folder (a fresh copy per test)."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _no_leftovers(out: Path) -> None:
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["nan", "interrupt", "full disk"])
def test_a_failed_overwrite_leaves_the_previous_output_byte_identical(failure, previous,
                                                                      monkeypatch):
    before = _snapshot(previous)
    assert {"model/weights.safetensors", "model.onnx", "report.json", "report.html"} <= set(before)
    logs: list[str] = []
    if failure == "full disk":  # everything else of the new run is written by then
        monkeypatch.setattr("slimkit.report.write_report", _full_disk)
        with pytest.raises(OSError, match="No space left"):
            _compress(previous, _recipe({**PRUNE, "sparsity": 0.8}), logs, overwrite=True)
    elif failure == "nan":
        with pytest.raises(ModelError, match=r"stage 2 \(faults_poison\): parameter"):
            _compress(previous, _recipe(PRUNE, {"kind": "faults_poison"}), logs,
                      overwrite=True)
    else:
        with pytest.raises(KeyboardInterrupt):
            _compress(previous, _recipe(PRUNE, {"kind": "faults_poison", "how": "interrupt"}),
                      logs, overwrite=True)
    assert _snapshot(previous) == before
    assert logs[-1] == f"'{previous}' keeps its previous output: the --overwrite run failed"
    _no_leftovers(previous)


def test_a_successful_overwrite_replaces_the_output(previous):
    report = _compress(previous, _recipe({**PRUNE, "sparsity": 0.8}), overwrite=True)
    assert report["outputs"] == {"artifact": str(previous / "model"),
                                 "onnx": str(previous / "model.onnx")}
    assert report["recipe"]["stages"][0]["sparsity"] == 0.8
    model = load_artifact(previous / "model", template=build()[0].module)
    assert model.history[-1]["config"]["sparsity"] == 0.8
    assert sorted(p.name for p in (previous / ".slimkit-run").iterdir()) == [
        "baseline", "baseline.onnx", "stage-00", "state.json"]
    _no_leftovers(previous)


def test_leftovers_of_a_killed_overwrite_are_cleared(previous):
    """Killed while building: the half-built new run goes. Killed between the two renames of
    the swap: the parked previous output is put back."""
    half = previous.with_name(".out.slimkit-new")
    (half / ".slimkit-run" / "stage-00").mkdir(parents=True)
    parked = previous.with_name(".out.slimkit-old")
    previous.rename(parked)
    before = _snapshot(parked)
    logs: list[str] = []
    _compress(previous, _recipe(PRUNE), logs, resume=True)
    assert f"'{previous}': put back the previous output, which an --overwrite run killed " \
        f"while swapping had parked at '{parked}'" in logs
    assert f"'{previous}': removed '{half}', left by an --overwrite run that was killed" in logs
    after = _snapshot(previous)
    for name in ("model/weights.safetensors", ".slimkit-run/stage-00/weights.safetensors"):
        assert after[name] == before[name]
    _no_leftovers(previous)


def test_a_leftover_holding_foreign_files_is_refused(previous):
    half = previous.with_name(".out.slimkit-new")
    (half / ".slimkit-run").mkdir(parents=True)
    (half / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError) as err:
        _compress(previous, _recipe(PRUNE), overwrite=True)
    assert str(err.value) == (
        f"leftover of a killed --overwrite run '{half}' holds files slimkit did not write "
        "(thesis.tex); refusing to delete them: move them away or choose another --out")
    assert (half / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("flags", [{"resume": True}, {"overwrite": True},
                                   {"resume": True, "overwrite": True}])
def test_a_run_folder_without_state_holding_foreign_files_is_never_deleted(flags,
                                                                           tmp_path: Path):
    """Issue 16 item 8: ``--resume`` here deleted the whole folder."""
    out = tmp_path / "photos"
    (out / ".slimkit-run").mkdir(parents=True)
    (out / "cat.jpg").write_bytes(b"precious")
    (out / ".slimkit-run" / "notes.txt").write_text("mine too")
    before = _snapshot(out)
    with pytest.raises(OutputExistsError) as err:
        _compress(out, _recipe(PRUNE), **flags)
    assert str(err.value) == (
        f"output '{out}' holds files slimkit did not write (.slimkit-run/notes.txt, cat.jpg); "
        "refusing to delete them: move them away or choose another --out")
    assert _snapshot(out) == before
    _no_leftovers(out)


def test_files_added_to_a_finished_run_are_never_deleted(previous):
    (previous / "notes.txt").write_text("mine")
    (previous / "model.onnx").unlink()
    (previous / "model.onnx").symlink_to(previous / "notes.txt")
    before = _snapshot(previous)
    with pytest.raises(OutputExistsError, match=r"did not write \(model.onnx, notes.txt\)"):
        _compress(previous, _recipe(PRUNE), overwrite=True)
    assert _snapshot(previous) == before


def test_resume_without_state_starts_over_only_when_nothing_finished(previous, tmp_path):
    (previous / ".slimkit-run" / "state.json").unlink()
    before = _snapshot(previous)
    with pytest.raises(OutputExistsError) as err:
        _compress(previous, _recipe(PRUNE), resume=True)
    assert str(err.value) == (
        f"output '{previous}' holds no interrupted run to resume (.slimkit-run/state.json is "
        "missing); pass --overwrite to replace it")
    assert _snapshot(previous) == before
    bare = tmp_path / "bare"
    (bare / ".slimkit-run" / ".baseline.x1y2").mkdir(parents=True)  # killed mid-write
    logs: list[str] = []
    _compress(bare, _recipe(PRUNE), logs, resume=True)
    assert f"'{bare}': no stage of the earlier run had finished; starting over" in logs
    assert (bare / "model" / "weights.safetensors").is_file()
