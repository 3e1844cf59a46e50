"""A run killed anywhere resumes to the very bytes of a run that was never interrupted.

Each test kills a tiny two-stage run (both stages fine-tune with mid-stage checkpoints) at one
point, resumes it, and compares every weight file, the ONNX file and the manifests with an
uninterrupted run, byte for byte. One kill is a real ``kill -9`` of a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tests.faults._job import KILL_POINTS, build, dying_at

from slimkit.core.errors import ResumeError
from slimkit.pipeline import compress
from slimkit.train.checkpoint import run_fingerprint

WEIGHT_FILES = ("model/weights.safetensors", ".slimkit-run/baseline/weights.safetensors",
                ".slimkit-run/stage-00/weights.safetensors",
                ".slimkit-run/stage-01/weights.safetensors")


class Killed(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch and carry on)."""


def _die() -> None:
    raise Killed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here at one intra-op thread (the count is part of a run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(out: Path, structural: bool = False, **flags) -> dict:
    """A run that keeps its checkpoints, which are compared byte for byte (that a run removes
    them after success, a resumed one too, is tested in tests/test_cli.py)."""
    flags.setdefault("keep_checkpoints", True)
    model, data, recipe = build(structural)
    logs: list[str] = []
    report = compress(model, data, recipe, out, progress=False, log=logs.append, **flags)
    report["_logs"] = logs
    return report


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[bool, Path]:
    """Uninterrupted runs of the plain and of the structural recipe."""
    root = tmp_path_factory.mktemp("reference")
    return {s: (_run(root / str(s), s), root / str(s))[1] for s in (False, True)}


def _assert_same_run(got: Path, want: Path) -> None:
    for rel in (*WEIGHT_FILES, "model.onnx"):
        assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel
    for art in ("model", ".slimkit-run/stage-00", ".slimkit-run/stage-01"):
        a, b = (json.loads((d / art / "manifest.json").read_text()) for d in (got, want))
        # The graph archive's zip headers carry the time it was written: compare its members.
        for m in (a, b):
            m["files"]["model.pt2"].pop("sha256")
        assert a == b, art
        za, zb = (zipfile.ZipFile(d / art / "model.pt2") for d in (got, want))
        with za, zb:
            assert {i.filename: za.read(i) for i in za.infolist()} == \
                {i.filename: zb.read(i) for i in zb.infolist()}, art
    a, b = (json.loads((d / "report.json").read_text()) for d in (got, want))
    for key in ("accuracy", "params", "nonzero_params", "size_bytes"):
        assert a["final"][key] == b["final"][key], key
    assert a["fidelity"] == b["fidelity"]
    assert [s["changed"] for s in a["stages"]] == [s["changed"] for s in b["stages"]]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_any_point_resumes_bit_identical(point, reference, tmp_path: Path):
    out = tmp_path / "run"
    with dying_at(point, _die), pytest.raises(Killed):
        _run(out)
    report = _run(out, resume=True)
    _assert_same_run(out, reference[False])
    done = {"baseline": 0, "train-00": 0, "stage-00": 1, "train-01": 1}.get(point, 2)
    assert sum("finished in an earlier run" in line for line in report["_logs"]) == done
    if point.startswith("train-"):  # it went on from the training checkpoint, not from zero
        stage = report["stages"][int(point[-1])]
        assert stage["details"]["finetune"]["resumed_from_step"] == 2


@pytest.mark.parametrize("point", ["stage-00", "train-01"])
def test_resume_after_a_structural_stage_keeps_the_module_structure(point, reference,
                                                                   tmp_path: Path):
    """After ``lowrank`` the next stage must find the factorized Linear layers again (the
    exported graph a plain module's artifact holds has none to prune)."""
    out = tmp_path / "run"
    with dying_at(point, _die), pytest.raises(Killed):
        _run(out, structural=True)
    report = _run(out, structural=True, resume=True)
    assert report["stages"][1]["changed"]
    _assert_same_run(out, reference[True])


def test_kill_9_mid_stage_then_resume(reference, tmp_path: Path):
    """A real SIGKILL during stage 2's training: no finally ran, the lock is left behind."""
    out = tmp_path / "run"
    job = Path(__file__).with_name("_job.py")
    proc = subprocess.run([sys.executable, str(job), str(out), "train-01"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    lock = out.with_name(".run.slimkit-lock")
    dead_pid = int(lock.read_text())
    assert (out / ".slimkit-run" / "stage-01-train" / "train-checkpoint.pt").is_file()
    report = _run(out, resume=True)
    assert any(f"stale lock '{lock}' left by slimkit run pid {dead_pid}" in line
               for line in report["_logs"])
    assert report["stages"][1]["details"]["finetune"]["resumed_from_step"] == 2
    _assert_same_run(out, reference[False])
    assert not lock.exists()


def test_resume_at_another_thread_count_is_refused(tmp_path: Path):
    out = tmp_path / "run"
    with dying_at("stage-00", _die), pytest.raises(Killed):
        _run(out)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ResumeError) as err:
            _run(out, resume=True)
    finally:
        torch.set_num_threads(1)
    assert str(err.value) == (
        f"'{out}' was run with 1 intra-op thread and this run has 2; the thread count "
        "changes the results, so resuming would not reproduce the run. Resume with 1 intra-op "
        "thread (torch.set_num_threads or OMP_NUM_THREADS), or --overwrite to start over")
    assert [s["index"] for s in _run(out, resume=True)["stages"]] == [0, 1]


def test_a_training_checkpoint_belongs_to_one_thread_count():
    model, data, _ = build()
    args = (model.module, (data.x_train, data.y_train), {"lr": 1e-3}, "CrossEntropy")
    one = run_fingerprint(*args)
    torch.set_num_threads(2)
    try:
        two = run_fingerprint(*args)
    finally:
        torch.set_num_threads(1)
    assert one != two and run_fingerprint(*args) == one
