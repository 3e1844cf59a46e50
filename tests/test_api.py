"""The public Python API: any nn.Module plus example inputs."""

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.errors import ConfigError, ModelError


def test_compress_a_plain_module_leaves_it_untouched(digits, mlp, tmp_path: Path):
    net = mlp.module  # a plain nn.Sequential
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recipe = {"stages": [{"kind": "magnitude_prune", "sparsity": 0.5}],
              "target": {"max_accuracy_drop": 10},
              "measure": {"batch_sizes": [1, 4], "repeats": 2, "warmup": 1}}
    report = slimkit.compress(net, digits, recipe, tmp_path / "o", progress=False,
                              log=lambda s: None)
    assert report["verdict"]["met"] and report["model"]["input_shape"] == [1, 8, 8]
    assert report["final"]["nonzero_params"] < report["baseline"]["nonzero_params"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    loaded = slimkit.load_model(str(tmp_path / "o" / "model"))
    x = digits.x_test[:5]
    torch.testing.assert_close(loaded.module(x), slimkit.load_artifact(
        tmp_path / "o" / "model", template=net).module(x))


def test_wrap_checks_the_module_against_its_example():
    m = slimkit.wrap(nn.Linear(4, 3), torch.randn(2, 4))
    assert m.input_shape == (4,) and m.num_classes == 3
    with pytest.raises(ModelError, match=r"cannot run on an input of shape \(2, 5\)"):
        slimkit.wrap(nn.Linear(4, 3), torch.randn(2, 5))
    with pytest.raises(ModelError, match=r"cannot run on inputs input \(2, 4\), input_1 "):
        slimkit.wrap(nn.Linear(4, 3), (torch.randn(2, 4), torch.randn(2, 4)))

    class Pair(nn.Module):
        def forward(self, x, y):
            return {"sum": x + y, "diff": x - y}

    pair = slimkit.wrap(Pair(), (torch.randn(2, 4), torch.randn(2, 4)), output="diff")
    assert pair.input_style == "tuple" and pair.output == "diff"
    assert [s.name for s in pair.input_specs] == ["input", "input_1"]
    with pytest.raises(ConfigError, match="output: the model has no output 'prod'; its "
                                          "outputs are sum, diff"):
        slimkit.wrap(Pair(), (torch.randn(2, 4), torch.randn(2, 4)), output="prod")
    with pytest.raises(ConfigError, match="dynamic_axes: no input named 'ids'; the inputs "
                                          "are x"):
        slimkit.wrap(nn.Linear(4, 3), {"x": torch.randn(2, 4)}, dynamic_axes={"ids": {1: "s"}})
    assert "compress" in slimkit.__all__ and slimkit.__version__


def test_compress_returns_the_model_in_the_users_class(tmp_path):
    """The result is the report plus the compressed model, loaded back into the user's own
    class when its structure did not change (magnitude pruning keeps it)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(64, 8)
    data = slimkit.DataBundle("toy", x, (x[:, 0] > 0).long(), x, (x[:, 0] > 0).long(), 3)
    recipe = {"stages": [{"kind": "magnitude_prune", "sparsity": 0.5}],
              "measure": {"batch_sizes": [1], "repeats": 2, "warmup": 1}}
    result = slimkit.compress(net, data, recipe, tmp_path / "out", progress=False,
                              log=lambda _m: None)
    assert result["verdict"]["met"] is True and result.report["outputs"] == result["outputs"]
    assert type(result.model.module) is Net
    assert result.onnx == tmp_path / "out" / "model.onnx" and result.html.is_file()
    weights = torch.cat([m.weight.flatten() for m in (result.model.module.fc1,
                                                      result.model.module.fc2)])
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert torch.count_nonzero(net.fc1.weight) == net.fc1.weight.numel()  # input untouched
