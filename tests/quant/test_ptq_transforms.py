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
    smoothed, skipped = smooth(net, x, alpha=0.5)
    assert smoothed == {"q": "ln", "k": "ln", "fc": "ln2"} and skipped == []
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)
    after = channel_absmax(net, ["ln"], x)["ln"]
    assert after.max() / after.min() < 0.5 * before.max() / before.min()


class _Mlp(nn.Module):
    """LayerNorm -> fc1 -> ReLU -> fc2, a GELU-fed fc3, and a Linear ``shared`` called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 16)
        self.fc3 = nn.Linear(16, 16)
        self.ln2 = nn.LayerNorm(16)
        self.shared = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.ln(x))))
        y = self.fc3(nn.functional.gelu(y))
        h = self.ln2(y)
        return self.shared(h) + self.shared(h)


def test_smoothquant_folds_through_relu_into_the_linear_before():
    torch.manual_seed(0)
    net = _Mlp().double().eval()
    with torch.no_grad():
        net.fc1.weight[:3] *= 40.0  # outlier channels of fc2's input
        net.fc1.bias[:3] *= 40.0
    x = torch.randn(128, 16, dtype=torch.float64)
    ref = net(x)
    before = channel_absmax(net, ["fc2"], x, where="input")["fc2"]
    smoothed, skipped = smooth(net, x, alpha=0.5)
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)
    after = channel_absmax(net, ["fc2"], x, where="input")["fc2"]
    assert smoothed == {"fc1": "ln", "fc2": "fc1"}
    assert after.max() / after.median() < 0.5 * before.max() / before.median()
    why = {s["what"]: s["why"] for s in skipped}
    assert set(why) == {"fc3", "shared"}, why
    assert "GELU" in why["fc3"] and "more than once" in why["shared"]


def test_smoothquant_targets_and_untraceable_models():
    torch.manual_seed(0)
    net = _Mlp().double().eval()
    x = torch.randn(32, 16, dtype=torch.float64)
    smoothed, skipped = smooth(net, x, targets={"fc2"})
    assert smoothed == {"fc2": "fc1"} and skipped == []

    class Blind(_Mlp):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if bool(x.isfinite().all()) else x

    blind = Blind().double().eval()
    ref = blind(x)
    smoothed, skipped = smooth(blind, x)
    assert smoothed == {} and torch.equal(blind(x), ref)
    assert [s["what"] for s in skipped] == ["fc1", "fc2", "fc3", "shared"]
    assert all("could not be traced" in s["why"] for s in skipped)


def test_ptq_smoothquant_on_a_convnet_says_why_nothing_was_smoothed():
    net, x = _convnet().float(), torch.randn(16, 3, 10, 10)
    _, rec = _ptq(net, PtqConfig(smoothquant=True, min_conv_reduction=0), x)
    why = {s["what"]: s["why"] for s in rec.skipped}
    assert rec.details["smoothed"] == {} and why["6"].startswith("SmoothQuant:")
    _, rec = _ptq(net, PtqConfig(smoothquant=True, min_conv_reduction=0, exclude=["6"]), x)
    assert any(s["what"] == "smoothquant" and "no Linear" in s["why"] for s in rec.skipped)
