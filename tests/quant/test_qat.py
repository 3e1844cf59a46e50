"""QAT with LSQ: gradients vs a hand-derived reference, training on digits, freezing, artifacts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.quant.calibrate import calibrate_inputs
from slimkit.quant.modules import FakeQuant, QuantLayer
from slimkit.quant.plan import QuantSpec, freeze, wrap_layers
from slimkit.quant.qat import LsqQuant, QatConfig, qat
from slimkit.train.loop import evaluate

FT = {"max_steps": 60, "lr": 1e-3}


def _lsq_reference(x, s, go, qmin, qmax, n_per_scale):
    """LSQ's gradients written out case by case (Esser et al. 2019, eq. 3), float64."""
    v = x / s
    inside = (v > qmin) & (v < qmax)
    ds_elem = torch.where(v <= qmin, torch.full_like(v, qmin),
                          torch.where(v >= qmax, torch.full_like(v, qmax), torch.round(v) - v))
    g = 1.0 / math.sqrt(n_per_scale * qmax)
    return go * inside, ds_elem * go * g


def test_lsq_gradient_matches_hand_derived_reference_per_tensor():
    x = torch.tensor([-2.3, -0.74, -0.1, 0.0, 0.26, 0.9, 1.37, 5.0], dtype=torch.float64)
    fq = LsqQuant(bits=3).double()
    fq.scale.data = torch.tensor(0.4, dtype=torch.float64)
    x.requires_grad_(True)
    go = torch.linspace(-1, 1.5, 8, dtype=torch.float64)
    out = fq(x)
    (out * go).sum().backward()
    dx, ds = _lsq_reference(x.detach(), 0.4, go, -4, 3, 8)
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=1e-12)
    torch.testing.assert_close(fq.scale.grad, ds.sum(), rtol=1e-12, atol=1e-12)
    # Forward: clip(round(x / s)) * s.
    ref = torch.clamp(torch.round(x.detach() / 0.4), -4, 3) * 0.4
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)


def test_lsq_gradient_per_channel_and_asymmetric_zero_point():
    torch.manual_seed(0)
    w = torch.randn(3, 5, dtype=torch.float64)
    fq = LsqQuant(bits=4, granularity="channel").double()
    s = torch.tensor([[0.1], [0.3], [0.05]], dtype=torch.float64)
    fq.scale.data = s.clone()
    fq.zero_point = torch.zeros(3, 1, dtype=torch.int32)
    go = torch.randn(3, 5, dtype=torch.float64)
    (fq(w) * go).sum().backward()
    _, ds = _lsq_reference(w, s, go, -8, 7, 5)
    torch.testing.assert_close(fq.scale.grad, ds.sum(dim=1, keepdim=True), rtol=1e-12,
                               atol=1e-12)
    # Asymmetric unsigned: x_hat = (round(clip(x/s + z)) - z) s; clipped ends give qmin-z, qmax-z.
    a = LsqQuant(bits=2, symmetric=False, signed=False).double()
    a.set_range(torch.tensor(-0.5), torch.tensor(1.0))
    s, z = float(a.scale.detach()), int(a.zero_point)
    x = torch.tensor([-3.0, -0.2, 0.33, 0.8, 9.0], dtype=torch.float64)
    (a(x)).sum().backward()
    v = x / s + z
    ref = torch.where(v <= 0, torch.full_like(v, 0.0 - z),
                      torch.where(v >= 3, torch.full_like(v, 3.0 - z), torch.round(v) - v))
    torch.testing.assert_close(a.scale.grad, ref.sum() / math.sqrt(5 * 3), rtol=1e-12,
                               atol=1e-12)


def test_lsq_init_and_fixed_conversion_agree():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    fq = LsqQuant(bits=4, granularity="channel")
    fq.calibrate_from(w)
    torch.testing.assert_close(fq.scale.detach(), 2 * w.abs().mean(1, keepdim=True) / math.sqrt(7))
    fixed = fq.to_fixed()
    assert type(fixed) is FakeQuant and not any(True for _ in fixed.parameters())
    torch.testing.assert_close(fq(w).detach(), fixed.dequantize(fixed.quantize(w)),
                               rtol=0, atol=1e-6)
    # State dicts of any qparam shape load into a fresh quantizer (scale stays a Parameter).
    fresh = LsqQuant(bits=4, granularity="channel")
    fresh.load_state_dict(fq.state_dict())
    assert isinstance(fresh.scale, nn.Parameter) and fresh.scale.shape == (6, 1)


def _rtn_accuracy(model: nn.Module, data: DataBundle, bits: int) -> float:
    """4-bit round-to-nearest PTQ (per-channel weights, 8-bit min/max activations)."""
    work = copy.deepcopy(model)
    names = [n for n, m in work.named_modules() if isinstance(m, nn.Linear)]
    spec = {"weight": QuantSpec(bits=bits, granularity="channel"),
            "input": QuantSpec(bits=8, symmetric=False, signed=False)}
    layers = wrap_layers(work, {n: spec for n in names})
    calibrate_inputs(work, layers, data.x_train[:256])
    freeze(work)
    return evaluate(work, data.x_test, data.y_test)


def test_qat_lsq_beats_round_to_nearest_and_freezes_integer_codes(mlp, digits):
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    rtn = _rtn_accuracy(mlp.module, digits, 3)
    q, rec = stage_on(qat, mlp.module, QatConfig(weight_bits=3, finetune=FT), digits)
    acc = evaluate(q, digits.x_test, digits.y_test)
    assert acc == pytest.approx(rec.details["accuracy"]["after"])
    assert acc > rtn + 0.01, (acc, rtn)
    assert acc > rec.details["accuracy"]["float"] - 0.02
    state = q.state_dict()
    for name in ("1", "3", "5"):  # 3-bit codes stored packed two per byte
        packed = state[f"{name}.weight_packed"]
        assert packed.dtype == torch.uint8 and f"{name}.layer.weight" not in state
        codes = q.get_submodule(name).weight_q
        assert packed.numel() == codes.numel() // 2
        assert int(codes.min()) >= -4 and int(codes.max()) <= 3
    assert not any(isinstance(t, nn.Parameter) and t.dim() > 1 for t in q.parameters())
    row = rec.details["layers"]["3"]
    assert row["bits"] == 3 and row["act_bits"] == 8 and row["bytes"] < row["float_bytes"] / 7
    assert row["stored_bits"] == 4 and row["scheme"] == "symmetric"
    assert row["calibration"] == "minmax" and row["scale_mean_trained"] != row["scale_mean_init"]
    ql = q.get_submodule("3")  # the bias sits on the int32 grid s_x * s_w
    step = ql.input_fq.scale.double() * ql.weight_fq.scale.double().flatten()
    ratio = ql.layer.bias.detach().double() / step
    torch.testing.assert_close(ratio, ratio.round(), rtol=0, atol=1e-3)
    for k, v in mlp.module.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_qat_unpacked_freezes_int8_codes(mlp, digits):
    q, rec = stage_on(qat, mlp.module, QatConfig(weight_bits=4, pack=False, finetune=FT), digits)
    state = q.state_dict()
    for name in ("1", "3", "5"):
        codes = state[f"{name}.weight_q"]
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
        assert f"{name}.layer.weight" not in state
    assert set(rec.details["plan"]["layers"]) == {"1", "3", "5"}
    assert not rec.details["packed_plan"]
    assert rec.details["layers"]["1"]["stored_bits"] == 8


def test_qat_with_distillation_runs(mlp, digits):
    cfg = QatConfig(weight_bits=4, act_bits=None,
                    finetune={**FT, "max_steps": 20, "distill": {}})
    q, rec = stage_on(qat, mlp.module, cfg, digits)
    assert rec.details["finetune"]["steps"] == 20
    assert all(ql.input_fq is None for ql in q.modules() if isinstance(ql, QuantLayer))
    assert rec.details["accuracy"]["after"] > 0.8


def test_qat_activation_calibration_method(mlp, digits):
    cfg = QatConfig(weight_bits=8, act_bits=8, act_calibration="percentile",
                    finetune={"max_steps": 2})
    q, rec = stage_on(qat, mlp.module, cfg, digits)
    row = rec.details["layers"]["3"]
    assert row["calibration"] == "percentile" and row["act_scheme"] == "asymmetric"
    lo, hi = row["act_range"]
    assert lo == 0.0 and hi > 0  # the input of layer 3 follows a ReLU


def test_qat_artifact_round_trip(digits, tmp_path):
    zoo = load_zoo("lenet300", digits)
    cfg = QatConfig(weight_bits=4, first_last_bits=8, finetune={"max_steps": 5})
    out, rec = qat(zoo, cfg, StageContext(data=digits, progress=False))
    q = out.module
    assert rec.details["plan"] and rec.details["packed_plan"]  # 8-bit ends, packed middle
    assert [t["kind"] for t in out.arch["transforms"]] == ["quant_layers", "packed_quant"]
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert isinstance(back.module.get_submodule(next(iter(rec.details["layers"]))), QuantLayer)
    x = digits.x_test[:32]
    q.eval()
    torch.testing.assert_close(back.module(x), q(x), rtol=0, atol=0)


def test_qat_bad_inputs(mlp, digits):
    with pytest.raises(ConfigError, match="no Linear/Conv"):
        stage_on(qat, nn.Sequential(nn.Flatten(), nn.ReLU()), QatConfig(finetune=FT), digits)
    const = DataBundle("c", torch.zeros_like(digits.x_train), digits.y_train, digits.x_test,
                       digits.y_test, 10)
    with pytest.raises(DataError, match="constant"):
        stage_on(qat, mlp.module, QatConfig(finetune=FT), const)
    nan = digits.x_train.clone()
    nan[3, 0, 0, 0] = float("nan")
    bad = DataBundle("n", nan, digits.y_train, digits.x_test, digits.y_test, 10)
    with pytest.raises(DataError, match="NaN"):
        stage_on(qat, mlp.module, QatConfig(finetune=FT, calib_samples=2000), bad)
    with pytest.raises(ValidationError):
        QatConfig(weight_bits=9)
    with pytest.raises(ValidationError):
        QatConfig(act_bits=1)
    with pytest.raises(ConfigError, match="minmax"):
        stage_on(qat, mlp.module, QatConfig(act_calibration="bogus", finetune=FT), digits)
    with pytest.raises(ValidationError, match="lsq"):
        QatConfig(weight_quantizer="lsqq")


def test_qat_stage_through_compress(mlp, digits, tmp_path):
    from slimkit.pipeline import compress, load_recipe

    fast = {"threads": 1, "batch_sizes": [1], "warmup": 1, "repeats": 3}
    stage = {"kind": "qat", "weight_bits": 4, "finetune": {"max_steps": 20}}
    recipe = load_recipe({"stages": [stage], "target": {}, "measure": fast})
    report = compress(mlp, digits, recipe, tmp_path / "out", progress=False, log=lambda s: None)
    entry = report["stages"][0]
    assert entry["kind"] == "qat"
    assert entry["details"]["layers"]["1"]["bits"] == 4
    assert set(entry["details"]["packed_plan"]["layers"]) == {"1", "3", "5"}
    assert entry["details"]["layers"]["1"]["stored_bits"] == 4
    assert report["final"]["size_bytes"] < 0.6 * report["baseline"]["size_bytes"]
    # The ONNX file is QDQ with integer weights (slimkit.export.qdq): smaller than float, and
    # ONNX Runtime computes what the frozen model computes (biases on the s_x * s_w grid).
    assert report["comparison"]["onnx_size_ratio"] > 2
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4
    art = load_artifact(tmp_path / "out" / "model")
    assert evaluate(art.module, digits.x_test, digits.y_test) == pytest.approx(
        report["final"]["accuracy"]["top1"])
    # The artifact holds integer codes, not float weights.
    from slimkit.io.weights import load_weights

    state = load_weights(tmp_path / "out" / "model" / "weights.safetensors")
    assert state["1.weight_packed"].dtype == torch.uint8 and "1.layer.weight" not in state
