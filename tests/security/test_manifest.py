"""A forged artifact manifest: file names leaving the folder, links, wrong types, forged specs.

The manifest holds the checksums, so whoever edits it can make them agree with anything: every
forged manifest here lists correct checksums, and must still be refused with one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.errors import ModelLoadError
from slimkit.core.files import sha256_file
from slimkit.io.artifact import load_artifact, read_manifest, save_artifact
from slimkit.io.loader import load_model, load_zoo
from slimkit.io.model import SlimModel


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("art") / "a"
    save_artifact(load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    change(manifest)
    mpath.write_text(json.dumps(manifest))


def _entry(file: Path) -> dict:
    return {"sha256": sha256_file(file), "bytes": file.stat().st_size}


def _refused(path: Path, *parts: str) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def test_a_file_name_leaving_the_folder_is_refused(artifact: Path, tmp_path: Path):
    path = _copy(artifact, tmp_path / "a")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"outside the artifact")
    _edit(path, lambda m: m["files"].update({"../secret.bin": _entry(secret)}))
    _refused(path, "manifest.json' is malformed at files.../secret.bin",
             "not a plain file name inside the artifact folder")


def test_an_absolute_file_name_is_refused(artifact: Path, tmp_path: Path):
    path = _copy(artifact, tmp_path / "a")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"outside the artifact")
    _edit(path, lambda m: m["files"].update({str(secret): _entry(secret)}))
    _refused(path, f"malformed at files.{secret}", "no '/', '\\', '..', drive or absolute path")


def test_a_graph_name_leaving_the_folder_is_refused(artifact: Path, tmp_path: Path):
    path = _copy(artifact, tmp_path / "a")
    weights = path / "weights.safetensors"

    def forge(m: dict) -> None:
        m["architecture"] = {"pt2": "../model.pt2"}
        m["files"] = {"weights.safetensors": _entry(weights), "../model.pt2": _entry(weights)}

    _edit(path, forge)
    _refused(path, "malformed at files.../model.pt2", "not a plain file name")


def test_linked_files_are_refused(artifact: Path, tmp_path: Path):
    path = _copy(artifact, tmp_path / "a")
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.replace(path / "weights.safetensors", elsewhere)
    (path / "weights.safetensors").symlink_to(elsewhere)  # same bytes: the checksum agrees
    _refused(path, "weights.safetensors' is a symbolic link", "links are refused")
    os.replace(elsewhere, path / "weights.safetensors")
    os.replace(path / "manifest.json", tmp_path / "manifest.json")
    (path / "manifest.json").symlink_to(tmp_path / "manifest.json")
    _refused(path, "manifest.json' is a symbolic link")
    (path / "manifest.json").unlink()
    os.replace(tmp_path / "manifest.json", path / "manifest.json")
    assert load_artifact(path).input_shape == (1, 8, 8)


@pytest.mark.parametrize(("key", "value", "where", "why"), [
    ("history", "ran 5 stages", "history", "valid list"),
    ("history", [["stage"]], "history.0", "valid dictionary"),
    ("input_spec", {"shape": [1, -8, 8], "dtype": "float32"}, "input_spec.shape.1",
     "greater than or equal to 1"),
    ("input_spec", {"shape": [1, 8, 8], "dtype": "os.system"}, "input_spec.dtype",
     "not a torch dtype"),
    ("input_spec", {"shape": [64], "dtype": "float32"}, "input_spec.shape",
     "[64] differs from architecture.input_shape [1, 8, 8]"),
    ("num_classes", "10", "num_classes", "valid integer"),
    ("architecture", {"zoo": "lenet300", "pt2": "weights.safetensors"}, "architecture",
     "exactly one of"),
    ("architecture", {"zoo": "lenet300", "input_shape": [1, 8, 8]}, "architecture.num_classes",
     "Field required"),
    ("architecture", {"zoo": "lenet300", "input_shape": [1, 8, 8], "num_classes": 10,
                      "module": "os.system"}, "architecture.module", "Extra inputs"),
    ("files", {"weights.safetensors": {"sha256": "0" * 64, "bytes": "1"}},
     "files.weights.safetensors.bytes", "valid integer"),
    ("files", {"weights.safetensors": {"sha256": "not hex", "bytes": 1}},
     "files.weights.safetensors.sha256", "should match pattern"),
])
def test_malformed_manifests_name_the_key_path(artifact: Path, tmp_path: Path, key: str,
                                               value: object, where: str, why: str):
    path = _copy(artifact, tmp_path / "a")
    _edit(path, lambda m: m.update({key: value}))
    _refused(path, f"manifest.json' is malformed at {where}: ", why, "re-create the artifact")


def test_a_manifest_that_is_not_an_object(artifact: Path, tmp_path: Path):
    path = _copy(artifact, tmp_path / "a")
    (path / "manifest.json").write_text("[1, 2, 3]")
    _refused(path, "manifest.json' holds a JSON list, not an object")
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match="manifest.json' is corrupted"):
        read_manifest(path)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_forged_input_spec_of_a_graph_artifact_is_refused(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "g"
    save_artifact(SlimModel(module=_Net().eval(), input_shape=(6,), name="net"), path)
    assert load_artifact(path).input_shape == (6,)
    _edit(path, lambda m: m.update({"input_spec": {"shape": [4096, 4096],
                                                   "dtype": "float32"}}))
    _refused(path, "malformed at input_spec: float32 [4096, 4096] differs from the graph's "
                   "input float32 [6]")
