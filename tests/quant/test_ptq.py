"""Static PTQ: BatchNorm folding (float64), plans, calibration, biases, errors, artifacts."""

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.quant.fold import fold_batchnorm
from slimkit.quant.modules import QuantLayer
from slimkit.quant.ptq import PtqConfig, _ptq, ptq
from slimkit.train.loop import TrainConfig, fit


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def convnet(digits: DataBundle) -> nn.Module:
    net = tiny_convnet()
    fit(net, digits, TrainConfig(epochs=2, lr=5e-3), progress=False)
    return net.eval()


def _acc(net: nn.Module, d: DataBundle) -> float:
    with torch.no_grad():
        return float((net(d.x_test).argmax(1) == d.y_test).float().mean())


def test_fold_batchnorm_equals_float64_reference():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5)).double()
    for bn in (net[1], net[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    ref = net(x)
    pairs = fold_batchnorm(net)
    assert pairs == [("0", "1"), ("4", "5")]
    assert isinstance(net[1], nn.Identity) and net[0].bias is not None
    torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)


def test_ptq_quantizes_every_layer_and_keeps_accuracy(convnet, digits):
    before = {k: v.clone() for k, v in convnet.state_dict().items()}
    q, rec = stage_on(ptq, convnet, PtqConfig(num_samples=256, min_conv_reduction=0), digits)
    for k, v in convnet.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    layers = [m for m in q.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == 4 and all(m.frozen and m.weight_q.dtype == torch.int8 for m in layers)
    assert not any(k.endswith("layer.weight") for k in q.state_dict())
    assert rec.details["bn_pairs"] == [("0", "1")]
    assert abs(_acc(q, digits) - _acc(convnet, digits)) <= 0.02
    info = rec.details["layers"]
    assert info["0"]["output_shared_with"] == "4" and info["0"]["through"] == ["1", "2", "3"]
    assert info["9"]["output_shared_with"] is None and info["9"]["output_range"][0] < 0
    assert info["4"]["calibration"] == "percentile" and info["4"]["bits"] == 7


def test_output_quantizer_shares_the_consumer_input_qparams(convnet, digits):
    q, _ = stage_on(ptq, convnet,
                    PtqConfig(calibration="minmax", num_samples=128, min_conv_reduction=0),
                    digits)
    a, b = q[0], q[4]
    assert torch.equal(a.output_fq.scale, b.input_fq.scale)
    assert int(a.output_fq.zero_point) == 0  # the ReLU in between is exact
    # Bias on the int32 grid s_x * s_w.
    step = (b.input_fq.scale.double() * b.weight_fq.scale.double().flatten())
    codes = b.layer.bias.double() / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_every_calibration_method_runs(convnet, digits, method):
    q, rec = stage_on(ptq, convnet, PtqConfig(calibration=method, num_samples=64), digits)
    assert abs(_acc(q, digits) - _acc(convnet, digits)) <= 0.05
    assert all(v["calibration"] == method for v in rec.details["layers"].values())


def test_small_convs_stay_float_with_a_reason(convnet, digits):
    q, rec = stage_on(ptq, convnet,
                      PtqConfig(num_samples=64), digits)  # conv "0": 1 x 3 x 3 = 9 < 64
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[4], QuantLayer)
    assert any(s["what"] == "0" and "reduction size 9" in s["why"] for s in rec.skipped)


def test_include_exclude_and_skips(convnet, digits):
    q, rec = stage_on(ptq, convnet, PtqConfig(exclude=["9"], num_samples=64), digits)
    assert isinstance(q[9], nn.Linear)
    assert {"what": "9", "why": "excluded by the recipe"} in rec.skipped
    assert q[7].output_fq is not None  # its consumer is float now: own output quantizer
    with pytest.raises(ConfigError, match="no Linear/Conv"):
        stage_on(ptq, convnet, PtqConfig(include=["type:ReLU"]), digits)
    with pytest.raises(ConfigError, match="matches no layer"):
        stage_on(ptq, convnet, PtqConfig(include=["nope"]), digits)


def test_bad_calibration_data(convnet, digits):
    zeros = torch.zeros(16, 1, 8, 8)
    cfg = PtqConfig(min_conv_reduction=0)
    q, rec = _ptq(convnet, cfg, zeros)  # all-zero data: floored scales, finite outputs
    assert torch.isfinite(q(digits.x_test[:8])).all()
    assert float(q[0].input_fq.scale) > 0
    assert any(s["what"] == "0 bias" and "int32" in s["why"] for s in rec.skipped)
    bad = digits.x_test[:16].clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="layer '0:input'"):
        _ptq(convnet, cfg, bad)
    with pytest.raises(DataError, match="calibration data"):
        stage_on(ptq, convnet, PtqConfig(), None)
    with pytest.raises(ValidationError):
        PtqConfig(weight_bits=9)
    with pytest.raises(ValidationError, match="unknown calibration method"):
        PtqConfig(calibration="kl")


def test_artifact_round_trip_of_a_quantized_zoo_model(digits, tmp_path):
    from slimkit.io import load_artifact, save_artifact
    from slimkit.io.loader import load_zoo

    model = load_zoo("resnet20", digits)
    out, rec = ptq(model, PtqConfig(num_samples=32), StageContext(data=digits))
    q = out.module
    assert [t["kind"] for t in out.arch["transforms"]] == ["bn_fold", "quant_layers"]
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    x = digits.x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), q(x), rtol=0, atol=0)


def test_an_output_followed_by_relu_is_calibrated_after_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 16, 5), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                        nn.Linear(16, 3)).eval()
    x = torch.randn(64, 4, 20)
    q, rec = _ptq(net, PtqConfig(min_conv_reduction=0, calibration="minmax"), x)
    info = rec.details["layers"]["0"]
    assert info["output_shared_with"] is None and info["output_range"][0] == 0.0
    assert int(q[0].output_fq.zero_point) == 0
    with torch.no_grad():  # the quantizer clamps at 0: the ReLU after it changes nothing
        y = q[0](x)
    torch.testing.assert_close(torch.relu(y), y, rtol=0, atol=0)
