"""Quantization primitives against a float64 reference written independently here."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimkit.core.errors import ConfigError
from slimkit.quant import FakeQuant, QuantLayer
from slimkit.quant.primitives import (
    SCALE_FLOOR,
    Granularity,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    qrange,
    quantize,
    reduce_range,
    unpack,
)


def ref_fake_quant(x: list[float], bits: int, symmetric: bool, signed: bool) -> list[float]:
    """Scalar float64 reference: qparams from min/max (range widened to hold 0), then
    half-to-even rounding (Python's round) and clamping."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    lo, hi = min(min(x), 0.0), max(max(x), 0.0)
    if symmetric:
        scale = max(-lo, hi) / ((qmax - qmin) / 2)
        zero = (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = min(max(qmin - round(lo / max(scale, SCALE_FLOOR)), qmin), qmax)
    scale = max(scale, SCALE_FLOOR)
    scale = float(torch.tensor(scale, dtype=torch.float32))  # stored as float32, like ours
    out = []
    for v in x:
        q = min(max(round(float(torch.tensor(v / scale, dtype=torch.float32))) + zero, qmin),
                qmax)
        out.append((q - zero) * scale)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=40),
       st.integers(2, 8), st.booleans(), st.booleans())
def test_per_tensor_matches_float64_reference(values, bits, symmetric, signed):
    x = torch.tensor(values, dtype=torch.float32)
    got = fake_quantize(x, bits, symmetric, signed)
    want = torch.tensor(ref_fake_quant(values, bits, symmetric, signed), dtype=torch.float64)
    step = float(choose_qparams(*reduce_range(x), bits, symmetric, signed)[0])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=step * 1e-3 + 1e-6)


def test_rounding_is_half_to_even():
    scale, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), scale, zero, -128, 127)
    assert q.tolist() == [0, 2, 2, 0, -2]


@pytest.mark.parametrize("granularity", ["channel", "channel:1", "group:4", "group:3:0"])
def test_per_channel_and_group_equal_per_tensor_on_each_block(granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 12) * torch.logspace(-2, 1, 6).unsqueeze(1)
    got = fake_quantize(w, 4, symmetric=False, granularity=granularity)
    g = Granularity.parse(granularity)
    if g.kind == "channel":
        blocks = w.unbind(g.axis)
        want = torch.stack([fake_quantize(b, 4, symmetric=False) for b in blocks], g.axis)
    elif g.axis in (-1, 1):
        want = torch.cat([fake_quantize(b, 4, symmetric=False)
                          for b in w.flatten().split(g.group_size)]).view_as(w)
    else:
        want = torch.cat([fake_quantize(b, 4, symmetric=False)
                          for b in w.t().flatten().split(g.group_size)]).view(12, 6).t()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # finer granularity never loses accuracy on this wide-range tensor
    assert (got - w).abs().mean() < (fake_quantize(w, 4, False) - w).abs().mean()


def test_zero_is_exact_and_constant_ranges_do_not_divide_by_zero():
    for x in (torch.zeros(10), torch.full((10,), 3.0), torch.full((10,), -2.0)):
        for symmetric in (True, False):
            y = fake_quantize(x, 8, symmetric)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, x, rtol=1e-2, atol=1e-6)
    y = fake_quantize(torch.tensor([0.0, 0.3, 1.7]), 3, symmetric=False)
    assert y[0] == 0.0
    assert float(choose_qparams(torch.tensor(0.0), torch.tensor(0.0))[0]) == pytest.approx(
        SCALE_FLOOR)


def test_ranges_and_bad_widths():
    assert qrange(8) == (-128, 127) and qrange(8, signed=False) == (0, 255)
    assert qrange(4, narrow=True) == (-7, 7) and qrange(2) == (-2, 1)
    for bits in (1, 9, 0, 2.5):
        with pytest.raises(ConfigError, match="from 2 to 8"):
            qrange(bits)
    with pytest.raises(ConfigError, match="not divisible by the group size 5"):
        fake_quantize(torch.randn(4, 12), 4, granularity="group:5")
    with pytest.raises(ConfigError, match="granularity 'row'"):
        Granularity.parse("row")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_round_trip_and_size(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (37,))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
    assert unpack(packed, bits, 37).tolist() == codes.tolist()
    if bits == 4:  # two INT4 per byte, low nibble first
        assert pack(torch.tensor([1, 2]), 4).tolist() == [1 + (2 << 4)]
    with pytest.raises(ConfigError, match="offset them"):
        pack(torch.tensor([-1, 0]), bits)


def test_dequantize_inverts_quantize_on_the_grid():
    scale, zero = choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), 8, symmetric=False,
                                 signed=False)
    q = torch.arange(256, dtype=torch.uint8)
    x = dequantize(q, scale, zero)
    assert quantize(x, scale, zero, 0, 255).tolist() == q.tolist()


def test_fake_quant_module_matches_primitives_and_has_straight_through_grad():
    torch.manual_seed(0)
    x = (torch.randn(3, 50) * 2).requires_grad_()
    fq = FakeQuant(6, symmetric=False, signed=False)
    fq.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    y = fq(x)
    want = fq.dequantize(fq.quantize(x.detach()))
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=float(fq.scale) * 1.001)
    y.sum().backward()
    inside = (x.detach() >= -1.0) & (x.detach() <= 1.0 - float(fq.scale))
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert (x.grad[x.detach().abs() > 1.05] == 0).all()


def test_frozen_layer_stores_int8_codes_and_round_trips():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    ql = QuantLayer(conv, weight=FakeQuant(8, granularity="channel", narrow=True))
    ql.weight_fq.calibrate_from(conv.weight)
    x = torch.randn(2, 3, 6, 6)
    reference = conv(x)
    before = ql(x)
    ql.freeze()
    state = ql.state_dict()
    assert state["weight_q"].dtype == torch.int8 and "layer.weight" not in state
    torch.testing.assert_close(ql(x), before, rtol=0, atol=1e-6)
    fresh = QuantLayer(torch.nn.Conv2d(3, 8, 3), weight=FakeQuant(8, granularity="channel"))
    fresh.freeze()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), before, rtol=0, atol=1e-6)
    assert 0 < (before - reference).abs().max() < 0.05


def test_plan_wraps_layers_and_an_artifact_rebuilds_them(tmp_path):
    from slimkit.core.record import Record
    from slimkit.core.stages import commit_transforms
    from slimkit.io import load_artifact, save_artifact
    from slimkit.io.loader import load_zoo
    from slimkit.quant.plan import freeze, wrap_layers

    model = load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)
    plan = {"layers": {"conv1": {"weight": {"granularity": "channel", "narrow": True}},
                       "fc1": {"weight": {"bits": 4, "granularity": "group:8"},
                               "input": {"symmetric": False, "signed": False}}},
            "frozen": True}
    q = model.copy()
    wrapped = wrap_layers(q.module, plan["layers"])
    wrapped["fc1"].input_fq.set_range(torch.tensor(0.0), torch.tensor(4.0))
    freeze(q.module)
    commit_transforms(q, Record(transforms=[("quant_layers", plan)]))
    save_artifact(q, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    x = model.example_inputs(4)
    torch.testing.assert_close(back.module(*x), q.module.eval()(*x), rtol=0, atol=0)
    assert back.module.fc1.weight_q.dtype == torch.int8
    with pytest.raises(ConfigError, match="'conv9' is not in the model. Did you mean 'conv"):
        wrap_layers(model.copy().module, {"conv9": {}})
