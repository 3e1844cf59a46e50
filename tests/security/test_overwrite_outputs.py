"""``--overwrite`` never costs the previous output: export and pack build the new file beside
the old one and move it into place only after their own checks passed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit.train.loop
from slimkit.core.errors import DataError, ExportError, OutputExistsError
from slimkit.encode.cli import pack_command
from slimkit.encode.slimfile import unpack
from slimkit.export.onnx import export_checked
from slimkit.io.artifact import save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel


class Noisy(nn.Module):
    """Exports fine, but ONNX Runtime draws other random numbers: the parity check fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.rand_like(x[:, :3])


def _model(module: nn.Module) -> SlimModel:
    torch.manual_seed(0)
    return SlimModel(module=module.eval(), input_shape=(4,), name=type(module).__name__)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_export_keeps_the_previous_file_when_parity_fails(tmp_path: Path):
    out = tmp_path / "model.onnx"
    good = export_checked(_model(nn.Linear(4, 3)), out)
    assert good["parity"]["ok"] and good["bytes"] == out.stat().st_size
    before = out.read_bytes()
    with pytest.raises(ExportError) as err:
        export_checked(_model(Noisy()), out, overwrite=True)
    assert str(err.value).startswith("the ONNX export of 'Noisy' differs from PyTorch by ")
    assert str(err.value).endswith(f"(> 0.0001); '{out}' was left as it was")
    assert out.read_bytes() == before and _siblings(out) == ["model.onnx"]


def test_export_refuses_an_existing_file_before_any_work(tmp_path: Path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        export_checked(_model(Noisy()), out)
    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch .*; nothing was written"):
        export_checked(_model(Noisy()), fresh)
    assert not fresh.exists() and out.read_bytes() == b"previous"
    assert export_checked(_model(nn.Linear(4, 3)), out, overwrite=True)["parity"]["ok"]
    assert out.read_bytes()[:8] != b"previous"


def test_a_fifo_is_never_replaced(tmp_path: Path):
    # a device as --out is the same case; a FIFO in tmp_path is one the test can safely make
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for write in (lambda: export_checked(_model(nn.Linear(4, 3)), fifo, overwrite=True),
                  lambda: pack_command("zoo:lenet300", fifo, overwrite=True)):
        with pytest.raises(OutputExistsError) as err:
            write()
        assert str(err.value) == (f"output '{fifo}' is not a regular file (a device, pipe, "
                                  "folder or socket?); choose another path")
        assert stat.S_ISFIFO(fifo.stat().st_mode) and _siblings(fifo) == ["pipe"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = load_zoo("lenet300", input_shape=(1, 4, 4), num_classes=10)
    return save_artifact(model, tmp_path_factory.mktemp("art") / "a")


def test_pack_keeps_the_previous_file_when_the_data_does_not_fit(artifact: Path,
                                                                 tmp_path: Path):
    out = tmp_path / "model.slim"
    pack_command(str(artifact), out)
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"gives samples of shape \(1, 8, 8\) but model .* "
                                        r"takes \(1, 4, 4\)"):
        pack_command(str(artifact), out, bits=2, overwrite=True, data="builtin:digits")
    assert out.read_bytes() == before and _siblings(out) == ["model.slim"]


def test_pack_keeps_the_previous_file_when_its_check_fails(artifact: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "model.slim"
    pack_command(str(artifact), out)
    before = out.read_bytes()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(slimkit.train.loop, "evaluate", broken)
    data = str(tmp_path / "data.npz")
    _write_npz(data)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        pack_command(str(artifact), out, bits=2, overwrite=True, data=data)
    assert out.read_bytes() == before and _siblings(out) == ["data.npz", "model.slim"]
    monkeypatch.undo()
    report = pack_command(str(artifact), out, bits=2, overwrite=True, data=data)
    assert report["path"] == str(out) and report["bytes"] == out.stat().st_size
    assert out.read_bytes() != before and unpack(out).input_shape == (1, 4, 4)
    assert set(report["top1"]) == {"model", "packed", "data", "n_test"}


def _write_npz(path: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((40, 1, 4, 4)).astype(np.float32),
             y=np.arange(40) % 10)
