"""Counts after quantization: every weight counted whatever its storage, bits per weight per
layer, rows under the original layer names (issue 18). References are computed from the
integer codes themselves, a second path to the dequantized weights the counters read."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel
from slimkit.measure import count_params, layer_units, measure_static
from slimkit.measure.counts import layer_row
from slimkit.quant import PtqConfig, WeightOnlyConfig, ptq, weight_only_quant
from slimkit.quant.dynamic_linear import DynamicQuantLinear
from slimkit.quant.extreme import BinaryQuant, PackedQuantLayer, TernaryQuant
from slimkit.quant.modules import FakeQuant, QuantLayer
from slimkit.quant.packed import PackedConv, PackedLinear, packed_nbytes

NAMES = ["0", "2", "5", "7"]


def conv_linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


#: out x in (x kernel) weights plus biases of conv_linear_net, by hand
PARAMS = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (64 * 2048 + 64) + (10 * 64 + 10)


@pytest.fixture(scope="module")
def float_model() -> SlimModel:
    return SlimModel(module=conv_linear_net().eval(), input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def before(float_model: SlimModel, digits: DataBundle) -> dict:
    return measure_static(float_model, digits, layers=True)


@pytest.fixture(scope="module")
def ptq_model(float_model: SlimModel, digits: DataBundle) -> SlimModel:
    cfg = PtqConfig(num_samples=128, min_conv_reduction=0, reduce_range=False)
    return ptq(float_model, cfg, StageContext(data=digits))[0]


@pytest.fixture(scope="module")
def int4_model(float_model: SlimModel, digits: DataBundle) -> SlimModel:
    cfg = WeightOnlyConfig(bits=4, group_size=32, layer_types=["Linear", "Conv"],
                           calib_samples=64)
    return weight_only_quant(float_model, cfg, StageContext(data=digits))[0]


def _rows(measure: dict) -> dict[str, dict]:
    return {r["name"]: r for r in measure["layers"]}


def test_float_counts_are_unchanged(before: dict) -> None:
    assert before["params"] == before["nonzero_params"] == PARAMS
    assert before["bits_per_param"] == 32.0
    rows = _rows(before)
    assert list(rows) == NAMES
    assert [rows[n]["params"] for n in NAMES] == [160, 4640, 131136, 650]
    assert all(r["weight_bits"] == 32 and r["bytes"] == 4 * r["params"] for r in rows.values())
    assert count_params(conv_linear_net()) == {"params": PARAMS, "nonzero_params": PARAMS}


def test_ptq_int8_counts_every_weight_under_its_own_name(before: dict,
                                                         ptq_model: SlimModel,
                                                         digits: DataBundle) -> None:
    net = ptq_model.module
    # the weights really are int8 codes: no float weight is left as a parameter
    assert all(isinstance(net[int(n)], QuantLayer) and net[int(n)].frozen for n in NAMES)
    assert sum(p.numel() for p in net.parameters()) == 16 + 32 + 64 + 10
    after = measure_static(ptq_model, digits, layers=True)
    assert after["params"] == before["params"] == PARAMS
    rows, base = _rows(after), _rows(before)
    assert list(rows) == NAMES  # not "0.layer"
    expected_nonzero = 0
    for name in NAMES:
        ql, row = net[int(name)], rows[name]
        codes, bias = ql.weight_q, ql.layer.bias
        assert codes.dtype == torch.int8
        assert row["weight_bits"] == 8 and row["type"] == "QuantLayer"
        assert row["weight_shape"] == base[name]["weight_shape"] == list(codes.shape)
        assert row["params"] == base[name]["params"] == codes.numel() + bias.numel()
        # symmetric codes: a weight is zero exactly where its code is zero
        nonzero = int((codes != 0).sum()) + int((bias != 0).sum())
        assert row["nonzero_params"] == nonzero
        expected_nonzero += nonzero
        # bytes: one per code, float32 bias, and the qparams (scales, zero points) as overhead
        qparams = sum(b.numel() * b.element_size() for fq in (ql.weight_fq, ql.input_fq,
                                                              ql.output_fq) for b in fq.buffers())
        assert row["bytes"] == codes.numel() + 4 * bias.numel() + qparams
        assert row["macs"] == base[name]["macs"] > 0  # the wrapper is timed and counted
        assert row["latency_ms"] is not None
    assert after["nonzero_params"] == expected_nonzero
    assert after["bits_per_param"] == pytest.approx(
        (8 * (PARAMS - 122) + 32 * 122) / PARAMS)  # 122 float32 biases


def test_ptq_reduce_range_reports_seven_bit_codes(float_model: SlimModel,
                                                  digits: DataBundle) -> None:
    cfg = PtqConfig(num_samples=64, min_conv_reduction=0)  # reduce_range: [-63, 63]
    q = ptq(float_model, cfg, StageContext(data=digits))[0]
    assert [layer_row(m)["weight_bits"] for m in layer_units(q.module).values()] == [7] * 4
    assert count_params(q.module)["params"] == PARAMS


def test_weight_only_int4_counts_logical_weights(before: dict, int4_model: SlimModel,
                                                 digits: DataBundle) -> None:
    net = int4_model.module
    after = measure_static(int4_model, digits, layers=True)
    assert after["params"] == PARAMS
    rows, base = _rows(after), _rows(before)
    assert list(rows) == NAMES
    nonzero_total = 0
    for name in NAMES:
        layer, row = net[int(name)], rows[name]
        assert isinstance(layer, PackedConv | PackedLinear)
        assert row["weight_bits"] == 4
        assert row["weight_shape"] == base[name]["weight_shape"]
        assert row["params"] == base[name]["params"] == layer.rows * layer.cols + layer.rows
        # zero weights: codes equal to their group's zero point (reference from the codes)
        codes = layer.codes().reshape(layer.rows, layer.n_blocks, layer.block)
        zero = codes == layer.zeros()[..., None]
        nonzero = int((~zero).reshape(layer.rows, -1)[:, : layer.cols].sum())
        nonzero += int((layer.bias != 0).sum())
        assert row["nonzero_params"] == nonzero
        nonzero_total += nonzero
        assert row["macs"] == base[name]["macs"]
    assert after["nonzero_params"] == nonzero_total
    lin = net[5]
    assert rows["5"]["bytes"] == packed_nbytes(2048, 64, 4, lin.block, "float16", True)
    # half a byte per code plus scales: ~7x smaller than float32, not 4x fewer parameters
    assert rows["5"]["bytes"] < base["5"]["bytes"] / 7


def test_dynamic_int8_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    with torch.no_grad():
        lin.weight[:3] = 0
    for reduce_range, bits in ((False, 8), (True, 7)):
        net = nn.Sequential(nn.Flatten(), DynamicQuantLinear.from_linear(lin,
                                                                          reduce_range=reduce_range))
        counts = count_params(net, bits=True)
        codes = net[1].weight_q
        assert counts["params"] == 48 * 20 + 20
        assert counts["nonzero_params"] == int((codes != 0).sum()) + int((lin.bias != 0).sum())
        assert counts["nonzero_params"] <= 17 * 48 + 20
        assert counts["bits_per_param"] == pytest.approx((bits * 960 + 32 * 20) / 980)
        row = layer_row(net[1])
        assert (row["weight_bits"], row["weight_shape"], row["params"]) == (bits, [20, 48], 980)


@pytest.mark.parametrize(("quantizer", "bits"), [(BinaryQuant, 1), (TernaryQuant, 2)])
def test_packed_binary_and_ternary(quantizer: type, bits: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3)
    layer = PackedQuantLayer(conv, quantizer(granularity="channel"))
    layer.freeze()
    net = nn.Sequential(layer)
    row = layer_row(layer)
    codes = layer.weight_q
    assert row["weight_bits"] == bits and row["weight_shape"] == [12, 8, 3, 3]
    assert row["params"] == count_params(net)["params"] == 12 * 8 * 9 + 12
    assert row["nonzero_params"] == int((codes != 0).sum()) + int((conv.bias != 0).sum())
    packed = math.ceil(12 * 8 * 9 * bits / 8)
    assert layer.weight_packed.numel() == packed
    scales = sum(b.numel() * b.element_size() for b in layer.weight_fq.buffers())
    assert row["bytes"] == packed + 4 * 12 + scales


def test_fake_quantized_layer_counts_its_float_weight_once() -> None:
    """Before freezing (QAT), the float weight the codes come from is the layer's weight."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    fq = FakeQuant(4, granularity="channel")
    fq.calibrate_from(lin.weight.detach())
    net = nn.Sequential(QuantLayer(lin, fq))
    # non-zeros are those of the weight it computes with: 4-bit codes round small weights to 0
    nonzero = int((fq.quantize(lin.weight.detach()) != 0).sum()) + 4
    assert nonzero < 68
    assert count_params(net) == {"params": 68, "nonzero_params": nonzero}
    assert list(layer_units(net)) == ["0"]
    row = layer_row(net[0])
    assert (row["params"], row["weight_bits"], row["bytes"]) == (68, 4, 4 * 68 + 8 * 4)


def test_half_precision_layers_report_sixteen_bits() -> None:
    net = nn.Sequential(nn.Linear(8, 4)).half()
    assert layer_row(net[0])["weight_bits"] == 16
    assert count_params(net, bits=True)["bits_per_param"] == 16.0
