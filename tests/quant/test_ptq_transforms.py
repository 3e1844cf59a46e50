"""Float-equivalent rewrites before PTQ: equalization, SmoothQuant; and bias correction."""

import pytest
import torch
from torch import nn

from slimkit.quant.bias_correction import correct_biases
from slimkit.quant.equalize import equalize
from slimkit.quant.plan import wrap_layers
from slimkit.quant.ptq import PtqConfig, _ptq
from slimkit.quant.smoothquant import channel_absmax, smooth


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5)).double()
    with torch.no_grad():  # badly balanced channel ranges, as after BatchNorm folding
        net[0].weight.mul_(torch.logspace(-2, 1, 8, dtype=torch.float64).view(-1, 1, 1, 1))
        net[0].bias.mul_(torch.logspace(-2, 1, 8, dtype=torch.float64))
    return net.eval()


def test_equalization_keeps_outputs_and_equalizes_ranges():
    net = _convnet()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    ref = net(x)
    pairs = equalize(net, iterations=1)
    assert pairs == [("0", "3")]  # conv -> relu -> maxpool -> conv; not conv -> flatten -> fc
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-12)
    r1 = net[0].weight.abs().flatten(1).amax(1)
    r2 = net[3].weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-10, atol=0)


def test_equalization_in_ptq_helps_per_tensor_weights():
    net = _convnet().float()
    x = torch.randn(128, 3, 10, 10)
    ref = net(x)
    errs = []
    for eq in (False, True):
        cfg = PtqConfig(equalize=eq, weight_granularity="tensor", min_conv_reduction=0,
                        calibration="minmax")
        q, rec = _ptq(net, cfg, x)
        with torch.no_grad():
            errs.append(float((q(x) - ref).pow(2).mean()))
    assert rec.details["equalized"] == [("0", "3")]
    assert errs[1] < errs[0]


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(512, 32) + 3.0  # inputs with a large mean: rounding shifts the outputs
    net = nn.Sequential(layer)
    ql = wrap_layers(net, {"0": {"weight": {"bits": 3, "granularity": "tensor"}}})["0"]
    with torch.no_grad():
        ref = (x.double() @ ql.layer.weight.double().T + ql.layer.bias.double())
        before = (net(x).double() - ref).mean(0).abs().max()
    shifts = correct_biases(net, {"0": ql}, x, batch_size=100)
    with torch.no_grad():
        after = (net(x).double() - ref).mean(0).abs().max()
    assert shifts["0"] == pytest.approx(float(before), rel=1e-4)
    assert float(after) < 1e-4 * float(before) + 1e-6


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.ln2 = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        y = torch.relu(self.q(h)) * self.k(h)
        return self.fc(self.ln2(y + x)).mean(1)


def test_smoothquant_keeps_outputs_and_flattens_activation_ranges():
    torch.manual_seed(0)
    net = _Block().double().eval()
    with torch.no_grad():
        net.ln.weight[:2] = 30.0  # two outlier channels
    x = torch.randn(64, 5, 16, dtype=torch.float64)
    ref = net(x)
    before = channel_absmax(net, ["ln"], x)["ln"]
    done = smooth(net, x, alpha=0.5)
    assert sorted(done) == ["fc", "k", "q"]
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)
    after = channel_absmax(net, ["ln"], x)["ln"]
    assert after.max() / after.min() < 0.5 * before.max() / before.min()
