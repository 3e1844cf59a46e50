import io as pyio
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.errors import ModelLoadError, OutputExistsError, UntrustedPickleError
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_model, load_zoo
from slimkit.io.model import SlimModel
from slimkit.io.safety import no_pickle


class Custom(nn.Module):
    """A user's own module: no zoo spec, so the artifact carries a torch.export graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _outputs_equal(a: SlimModel, b: SlimModel) -> None:
    x = a.example_inputs(3)
    a.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.module(*x), b.module(*x), rtol=0, atol=0)


def test_zoo_artifact_round_trip(tmp_path: Path):
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_artifact(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["architecture"]["zoo"] == "lenet300"
    assert set(manifest["files"]) == {"weights.safetensors"}
    assert {"torch", "onnxruntime", "slimkit"} <= set(manifest["versions"])
    back = load_artifact(tmp_path / "a")
    assert back.input_shape == (1, 8, 8) and back.arch == model.arch
    _outputs_equal(model, back)


def test_custom_module_round_trips_through_pt2(tmp_path: Path):
    torch.manual_seed(0)
    net = Custom().eval()
    model = SlimModel(module=net, input_shape=(1, 8, 8), name="custom")
    save_artifact(model, tmp_path / "a")
    assert (tmp_path / "a" / "model.pt2").is_file()
    back = load_model(str(tmp_path / "a"))
    _outputs_equal(model, back)
    # The graph archive holds zeroed, deflated tensors: the weights are stored once.
    assert (tmp_path / "a" / "model.pt2").stat().st_size < \
        (tmp_path / "a" / "weights.safetensors").stat().st_size


def test_refuses_to_overwrite(tmp_path: Path):
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_artifact(model, tmp_path / "a")
    with pytest.raises(OutputExistsError):
        save_artifact(model, tmp_path / "a")
    save_artifact(model, tmp_path / "a", overwrite=True)


def test_checksum_mismatch_and_missing_files(tmp_path: Path):
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_artifact(model, tmp_path / "a")
    weights = tmp_path / "a" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch for .*weights.safetensors"):
        load_artifact(tmp_path / "a")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="weights.safetensors' is missing"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest.json' is corrupted"):
        load_artifact(tmp_path / "a")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither manifest.json"):
        load_model(str(tmp_path / "empty"))


def test_pickle_is_refused_without_opt_in(tmp_path: Path, digits):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(str(path), data=digits)
    loaded = load_model(str(path), data=digits, trust_pickle=True)
    assert loaded.input_shape == (1, 8, 8)
    # The guard used around torch.export.load turns a silent unpickling retry into an error.
    buf = pyio.BytesIO()
    torch.save({"x": Custom}, buf)
    buf.seek(0)
    with pytest.raises(UntrustedPickleError), no_pickle("evil.pt2", trust_pickle=False):
        torch.load(buf, weights_only=False)


def test_corrupted_pt2_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "m.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="m.pt2' is not a valid torch.export archive"):
        load_model(str(bad))


def test_pt2_file_loads_with_its_input_spec(tmp_path: Path):
    net = Custom().eval()
    x = torch.randn(2, 1, 8, 8)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    model = load_model(str(tmp_path / "m.pt2"))
    assert model.input_shape == (1, 8, 8) and model.input_dtype == "float32"
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), net(x))


def test_manifest_missing_keys_or_unlisted_weights(tmp_path: Path):
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    save_artifact(model, tmp_path / "a")
    mpath = tmp_path / "a" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["files"]["weights.safetensors"]
    del manifest["architecture"]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="lacks architecture, files.weights.safetensors"):
        load_artifact(tmp_path / "a")


def test_graph_artifact_keeps_non_persistent_buffers(tmp_path):
    """A buffer the weights file does not hold (registered non-persistent, as HF's
    position_ids) keeps its value in the .pt2 graph: zeroing it would change the outputs."""
    import torch
    from torch import nn

    from slimkit.api import wrap
    from slimkit.io.artifact import load_artifact, save_artifact

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("offset", torch.arange(4.0) + 1, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + self.offset)

    torch.manual_seed(0)
    model = wrap(Shifted().eval(), torch.randn(2, 4))
    save_artifact(model, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    x = torch.randn(5, 4)
    assert isinstance(back.module, torch.fx.GraphModule)
    torch.testing.assert_close(back.module(x), model.module(x), rtol=0, atol=0)
