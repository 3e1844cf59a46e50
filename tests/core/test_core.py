import os
from pathlib import Path

import pytest

from slimkit.core.errors import ConfigError, OutputExistsError
from slimkit.core.files import atomic_dir, atomic_path, sha256_file, write_text
from slimkit.core.registry import Registry


def test_registry_rejects_duplicates_and_suggests_closest():
    reg = Registry("criterion")
    reg.register("l1", 1)
    reg.register("l2", 2)
    assert reg.get("l2") == 2 and reg.names() == ["l1", "l2"] and "l1" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.register("l1", 3)
    with pytest.raises(ConfigError, match=r"unknown criterion 'l3'.*Known: l1, l2"):
        reg.get("l3")


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_dir_refuses_existing_and_replaces_with_overwrite(tmp_path: Path):
    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "a").write_text("1")
    with pytest.raises(OutputExistsError, match="--overwrite"), atomic_dir(out):
        pass
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as d:
        (d / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with atomic_dir(out, overwrite=True) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sha256_matches_hashlib(tmp_path: Path):
    import hashlib

    f = tmp_path / "x"
    f.write_bytes(b"abc" * 1000)
    assert sha256_file(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
