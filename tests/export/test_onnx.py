from pathlib import Path

import onnx
import pytest
import torch

from slimkit.core.errors import ExportError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.measure.onnx_stats import onnx_stats


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet20"])
def test_export_matches_pytorch_with_dynamic_batch(name: str, tmp_path: Path):
    model = load_zoo(name, input_shape=(1, 28, 28), num_classes=10)
    path = export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    for batch in (1, 5):
        parity = check_parity(model, path, model.example_inputs(batch))
        assert parity["ok"] and parity["max_abs_diff"] < 1e-4 and parity["batch"] == batch
    stats = onnx_stats(path)
    assert stats["params"] >= sum(p.numel() for p in model.module.parameters()) * 0.99


def test_exported_graph_module_goes_through_dynamo(tmp_path: Path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    ep = torch.export.export(net, (torch.randn(2, 1, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("b")},))
    model = SlimModel(module=ep.module(), input_shape=(1, 8, 8))
    path = export_onnx(model, tmp_path / "g.onnx")
    assert check_parity(model, path, model.example_inputs(3))["ok"]


def test_export_failure_is_an_export_error(tmp_path: Path):
    net = torch.nn.Linear(64, 10)  # cannot take the declared (3,) input
    with pytest.raises(ExportError, match="ONNX export of 'bad' failed"):
        export_onnx(SlimModel(module=net, input_shape=(3,), name="bad"), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()
