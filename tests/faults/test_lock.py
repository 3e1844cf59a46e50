"""One run at a time on an output: a second one refuses at once and touches nothing; a lock
left by a dead run is reported and taken over (issue 16, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.faults._job import build

from slimkit.core.errors import OutputExistsError
from slimkit.core.files import lock_path, output_lock
from slimkit.pipeline import compress


def _compress(out: Path, logs: list[str] | None = None, **flags) -> dict:
    model, data, recipe = build()
    return compress(model, data, recipe, out, progress=False,
                    log=logs.append if logs is not None else lambda s: None, **flags)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_a_second_run_refuses_while_one_runs_and_the_first_completes(tmp_path: Path):
    """A real run, paused mid-training in a child process, holds its output."""
    out = tmp_path / "out"
    job = Path(__file__).with_name("_job.py")
    child = subprocess.Popen([sys.executable, str(job), str(out), "train-01", "pause"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "paused\n"
        before = _snapshot(out)
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(OutputExistsError) as err:
                _compress(out, **flags)
            assert str(err.value) == (f"'{out}' is being written by another slimkit run (pid "
                                      f"{child.pid}); wait for it or choose another --out")
        assert _snapshot(out) == before
    finally:
        child.stdin.close()
        assert child.wait(timeout=120) == 0
    assert (out / "report.json").is_file() and (out / "model.onnx").is_file()
    assert not lock_path(out).exists()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path: Path):
    out = tmp_path / "out"
    pid = _dead_pid()
    lock = tmp_path / ".out.slimkit-lock"
    lock.write_text(f"{pid}\n")
    logs: list[str] = []
    _compress(out, logs)
    assert logs[0] == (f"'{out}': taking over a stale lock '{lock}' left by slimkit run pid "
                       f"{pid}, which is no longer running")
    assert (out / "report.json").is_file()
    assert not lock.exists()


def test_a_lock_without_a_pid_is_stale_too(tmp_path: Path):
    lock = lock_path(tmp_path / "out")
    lock.write_text("")
    logs: list[str] = []
    with output_lock(tmp_path / "out", logs.append):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert logs == [f"'{tmp_path / 'out'}': taking over a stale lock '{lock}' left by a "
                    "slimkit run, which is no longer running"]


def test_the_lock_holds_the_pid_and_goes_when_the_block_ends(tmp_path: Path):
    out = tmp_path / "out"
    lock = lock_path(out)
    with pytest.raises(RuntimeError, match="boom"), output_lock(out):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputExistsError, match=rf"\(pid {os.getpid()}\); wait for it"), \
                output_lock(tmp_path / "." / "out"):
            pass
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with output_lock(out):
        pass


def test_a_refused_run_releases_its_lock(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="not a slimkit run directory"):
        _compress(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_hard_links_the_lock_is_made_in_place(tmp_path: Path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    with output_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputExistsError, match="being written by another slimkit run"), \
                output_lock(out):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []
