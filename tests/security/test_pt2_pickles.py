"""A ``.pt2`` (or an artifact pointing at one) never runs code from the file without the opt-in.

``torch.export.load`` unpickles opaque-object constants with plain ``pickle.loads`` and
``use_pickle`` tensors with ``torch.load(weights_only=False)``. The archives here are forged in
the test from a real export: the payload, if run, creates a marker directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.errors import ModelLoadError, UntrustedPickleError
from slimkit.io.artifact import MANIFEST, load_artifact, save_artifact
from slimkit.io.loader import load_model
from slimkit.io.model import SlimModel
from slimkit.io.safety import load_exported


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does on load
        return os.mkdir, (str(self.marker),)


def _export(path: Path) -> None:
    net = nn.Sequential(nn.Linear(3, 2)).eval()
    program = torch.export.export(net, (torch.randn(2, 3),))
    torch.export.save(program, str(path))


def _forge(src: Path, dst: Path, marker: Path, how: str) -> None:
    """Copy archive ``src`` to ``dst`` with a pickled constant that makes ``marker``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info)
            if info.filename.endswith("data/constants/model_constants_config.json"):
                prefix = info.filename.removesuffix("model_constants_config.json")
                config = json.loads(raw)
                name = "opaque_obj_0" if how == "opaque" else "tensor_9"
                config["config"]["evil"] = {"path_name": name, "is_param": False,
                                            "use_pickle": True, "tensor_meta": None}
                raw = json.dumps(config).encode()
                zout.writestr(prefix + name, pickle.dumps(_Payload(marker)))
            zout.writestr(info, raw)


@pytest.fixture
def clean_pt2(tmp_path: Path) -> Path:
    path = tmp_path / "clean.pt2"
    _export(path)
    return path


@pytest.mark.parametrize("how", ["opaque", "tensor"])
def test_forged_pt2_is_refused_before_any_unpickling(clean_pt2: Path, tmp_path: Path, how: str):
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _forge(clean_pt2, evil, marker, how)
    with pytest.raises(UntrustedPickleError, match=r"evil\.pt2' holds pickled Python objects"):
        load_model(str(evil))
    assert not marker.exists()


def test_the_forged_archive_really_runs_code_without_the_guard(clean_pt2: Path, tmp_path: Path):
    """The reference: plain torch.export.load executes the opaque payload (what we refuse)."""
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _forge(clean_pt2, evil, marker, "opaque")
    with contextlib.suppress(Exception):  # torch may fail later; the payload ran first
        torch.export.load(str(evil))
    assert marker.exists()


def test_artifact_pointing_at_a_forged_graph_is_refused(tmp_path: Path):
    net = nn.Sequential(nn.Linear(3, 2)).eval()
    art = save_artifact(SlimModel(module=net, input_shape=(3,)), tmp_path / "art")
    graph = art / "model.pt2"
    assert graph.is_file()  # a model without a zoo spec is stored as a graph
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _forge(graph, evil, marker, "opaque")
    graph.write_bytes(evil.read_bytes())
    manifest = json.loads((art / MANIFEST).read_text())
    from slimkit.core.files import sha256_file

    manifest["files"]["model.pt2"] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UntrustedPickleError):
        load_artifact(art)
    assert not marker.exists()
    back = load_artifact(art, template=net)  # the user's own class needs no graph at all
    assert not marker.exists() and isinstance(back.module, nn.Sequential)


def test_a_clean_graph_loads_and_the_opt_in_is_respected(clean_pt2: Path, tmp_path: Path):
    model = load_model(str(clean_pt2))
    assert model.input_shape == (3,)
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _forge(clean_pt2, evil, marker, "opaque")
    load_exported(str(evil), trust_pickle=True)
    assert marker.exists()  # the user opted in: torch ran the pickle


def test_a_non_zip_pt2_is_one_clear_line(tmp_path: Path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelLoadError, match=r"^'.*bad\.pt2' is not a valid torch\.export archive "
                                             r"\(File is not a zip file\); give a file written "
                                             r"by torch\.export\.save$"):
        load_model(str(bad))
