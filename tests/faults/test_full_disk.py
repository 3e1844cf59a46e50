"""A real full disk: ``compress --overwrite`` on a small tmpfs that holds one run but not two.

Needs root (to mount a tmpfs); skipped with the reason otherwise. The monkeypatched ENOSPC of
test_overwrite.py covers the same path everywhere; this one lets the kernel say it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.faults.test_overwrite import PRUNE, _compress, _recipe, _snapshot

from slimkit.core.files import dir_size


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    size = _one_run_bytes(tmp_path / "probe")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # Room for one run and a half: an --overwrite run needs the old and the new side by side.
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _one_run_bytes(out: Path) -> int:
    _compress(out, _recipe(PRUNE))
    return dir_size(out) + 64 * 1024


def test_overwrite_on_a_full_disk_keeps_the_previous_output(small_disk: Path):
    out = small_disk / "out"
    _compress(out, _recipe(PRUNE))
    before = _snapshot(out)
    logs: list[str] = []
    with pytest.raises(OSError) as info:
        _compress(out, _recipe({**PRUNE, "sparsity": 0.8}), logs, overwrite=True)
    assert "No space left on device" in str(info.value) or info.value.errno == 28
    assert _snapshot(out) == before
    assert logs[-1] == f"'{out}' keeps its previous output: the --overwrite run failed"
    assert sorted(p.name for p in small_disk.iterdir()) == ["out"]  # no half-written sibling
