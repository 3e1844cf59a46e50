"""Binary (BWN) and ternary (TWN) weights: closed forms, STE, training, packed storage."""

from __future__ import annotations

import copy

import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.stages import StageContext
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.quant.extreme import (
    BinaryQuant,
    PackedQuantLayer,
    TernaryQuant,
    pack_layer,
    packed_bytes,
)
from slimkit.quant.plan import QuantSpec, wrap_layers
from slimkit.quant.qat import QatConfig, qat

FT = {"max_steps": 80, "lr": 2e-3}


def _ternary_reference(w: torch.Tensor) -> torch.Tensor:
    """TWN per output channel, one channel at a time in float64."""
    out = torch.zeros_like(w)
    for c in range(w.shape[0]):
        row = w[c].flatten()
        delta = 0.7 * row.abs().mean()
        big = row.abs() > delta
        alpha = row.abs()[big].mean()
        out[c] = (alpha * torch.sign(row) * big).reshape(w[c].shape)
    return out


def test_binary_two_values_per_channel_and_closed_form_alpha():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    wb = BinaryQuant(granularity="channel")(w)
    for c in range(5):
        alpha = w[c].abs().mean()
        assert set(wb[c].unique().tolist()) == {alpha.item(), -alpha.item()}
        torch.testing.assert_close(wb[c], alpha * torch.where(w[c] >= 0, 1.0, -1.0).double())
    # Per tensor: one alpha for all.
    wt = BinaryQuant(granularity="tensor")(w)
    assert len(wt.unique()) == 2


def test_ternary_three_values_per_channel_and_closed_form_alpha():
    torch.manual_seed(1)
    w = torch.randn(6, 20, dtype=torch.float64)
    wt = TernaryQuant(granularity="channel")(w)
    torch.testing.assert_close(wt, _ternary_reference(w), rtol=1e-12, atol=1e-12)
    for c in range(6):
        assert len(wt[c].unique()) == 3 and 0.0 in wt[c].tolist()


def test_straight_through_gradients():
    torch.manual_seed(0)
    for quant in (BinaryQuant(), TernaryQuant()):
        w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
        go = torch.randn(4, 7, dtype=torch.float64)
        (quant(w) * go).sum().backward()
        torch.testing.assert_close(w.grad, go, rtol=0, atol=0)


def test_group_granularity_refused():
    with pytest.raises(ConfigError, match="tensor or channel"):
        BinaryQuant(granularity="group:4")


@pytest.mark.parametrize("kind,bits,ratio", [("binary", 1, 32), ("ternary", 2, 16)])
def test_packed_layer_size_and_exact_codes(kind, bits, ratio):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96))
    wrap_layers(net, {"0": {"weight": QuantSpec(quantizer=kind, granularity="channel")}})
    x = torch.randn(8, 64)
    expected = net(x).detach()
    codes = net[0].weight_fq.quantize(net[0].layer.weight.detach())
    entry = pack_layer(net, "0")
    layer = net[0]
    assert isinstance(layer, PackedQuantLayer) and entry["code_bits"] == bits
    assert entry["binary"] == (kind == "binary")
    torch.testing.assert_close(layer.weight_q, codes, rtol=0, atol=0)
    torch.testing.assert_close(net(x), expected, rtol=1e-6, atol=1e-6)
    float_bytes = 64 * 96 * 4
    assert layer.weight_packed.numel() == 64 * 96 * bits // 8
    assert layer.weight_packed.numel() * ratio == float_bytes
    assert packed_bytes(layer) == float_bytes // ratio + 96 * 4
    assert "layer.weight" not in net.state_dict() and "0.weight_q" not in net.state_dict()


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_extreme_qat_trains_on_digits(mlp, digits, kind):
    q, rec = stage_on(qat, mlp.module, QatConfig(weight_quantizer=kind, finetune=FT), digits)
    acc = rec.details["accuracy"]
    assert acc["after"] > 0.6, acc  # chance is 0.1
    assert set(rec.details["packed_plan"]["layers"]) == {"1", "3", "5"}
    row = rec.details["layers"]["3"]
    assert row["bits"] == (1 if kind == "binary" else 2)
    assert row["bytes"] < row["float_bytes"] / (12 if kind == "binary" else 8)
    for m in q.modules():
        if isinstance(m, PackedQuantLayer):
            values = m.weight()
            n = 2 if kind == "binary" else 3
            assert all(len(values[c].unique()) <= n for c in range(values.shape[0]))


def test_first_last_layers_kept_at_8_bits(mlp, digits):
    cfg = QatConfig(weight_quantizer="binary", first_last_bits=8, finetune={"max_steps": 5})
    q, rec = stage_on(qat, mlp.module, cfg, digits)
    assert set(rec.details["plan"]["layers"]) == {"1", "5"}
    assert set(rec.details["packed_plan"]["layers"]) == {"3"}
    assert rec.details["layers"]["1"]["bits"] == 8 and rec.details["layers"]["3"]["bits"] == 1


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_packed_artifact_round_trip_and_shrinks(digits, tmp_path, kind):
    zoo = load_zoo("lenet300", digits)
    cfg = QatConfig(weight_quantizer=kind, first_last_bits=8, finetune={"max_steps": 5})
    out, rec = qat(zoo, cfg, StageContext(data=digits, progress=False))
    q = out.module
    save_artifact(out, tmp_path / "q")
    save_artifact(zoo, tmp_path / "f")
    back = load_artifact(tmp_path / "q")
    x = digits.x_test[:32]
    q.eval()
    torch.testing.assert_close(back.module(x), q(x), rtol=0, atol=0)
    size_q = (tmp_path / "q" / "weights.safetensors").stat().st_size
    size_f = (tmp_path / "f" / "weights.safetensors").stat().st_size
    assert size_q < size_f / 3.5, (size_q, size_f)
    assert copy.deepcopy(back.module) is not None


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize(("quantizer", "bits", "granularity"), [
    ("binary", 2, "channel"), ("ternary", 2, "channel"), ("binary", 2, "tensor"),
    ("lsq", 4, "channel"), ("lsq", 3, "tensor"), ("affine", 2, "channel:1")])
def test_freeze_empty_gives_the_structure_of_freeze_without_reading_values(
        layer, quantizer, bits, granularity):
    """The artifact rebuild (``freeze_empty``, from the plan entry) and the numeric path
    (``pack_layer``) hold the same tensors; the rebuild runs on meta, reading no value."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 6) if layer == "linear" else nn.Conv2d(3, 6, 3))

    net = make()
    spec = QuantSpec(quantizer=quantizer, bits=bits, granularity=granularity)
    wrap_layers(net, {"0": {"weight": spec}})
    entry = pack_layer(net, "0")
    packed = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for device in ("cpu", "meta"):
        with torch.device(device):
            fresh = make()
        ql = PackedQuantLayer(fresh[0], QuantSpec.model_validate(entry["weight"]).make(),
                              code_bits=entry["code_bits"], binary=entry["binary"])
        ql.freeze_empty()
        got = {"0." + k: tuple(v.shape) for k, v in ql.state_dict().items()}
        assert got.keys() == packed.keys()
        for k, shape in got.items():
            # A per-tensor scale is one value: [] here, [1, 1] from a sign quantizer's alpha.
            assert shape == packed[k] or {*shape, *packed[k]} <= {1}, (k, shape, packed[k])
        assert all(t.device.type == device for t in ql.state_dict().values())


def test_freeze_empty_refuses_what_freeze_never_stores():
    layer = PackedQuantLayer(nn.Linear(4, 2), BinaryQuant(), code_bits=1)
    with pytest.raises(ConfigError, match="fixed 'affine' one, not BinaryQuant"):
        layer.freeze_empty()
    fq = QuantSpec(bits=2, narrow=True).make()
    with pytest.raises(ConfigError, match="1, 2, 4 or 8 bits wide, not 3"):
        PackedQuantLayer(nn.Linear(4, 2), fq, code_bits=3).freeze_empty()
