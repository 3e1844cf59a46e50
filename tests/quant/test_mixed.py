"""Mixed precision: sensitivities vs a direct reference, allocation, fallback, artifacts."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.quant import mixed
from slimkit.quant.extreme import PackedQuantLayer
from slimkit.quant.mixed import (
    FLOAT,
    MixedPrecisionConfig,
    allocate_bits,
    layer_sensitivity,
    mixed_precision,
    weight_bytes,
)
from slimkit.quant.modules import QuantLayer
from slimkit.train.loop import evaluate


def test_weight_bytes_counts_packed_codes_and_scales():
    w = torch.zeros(10, 3, 3, 3)
    assert weight_bytes(w, FLOAT) == 4 * 270
    assert weight_bytes(w, 8) == 270 + 40
    assert weight_bytes(w, 4) == 135 + 40
    assert weight_bytes(w, 2) == 68 + 40  # 270 * 2 bits = 67.5 bytes, rounded up


def test_sensitivity_matches_direct_reference(mlp, digits):
    net = mlp.module
    x = digits.x_train[:128]
    layers = {"3": net[3]}
    table = layer_sensitivity(net, layers, [8, 4, 2], x, "mse")
    ref_out = net(x).detach().double()
    for bits in (8, 4, 2):
        other = copy.deepcopy(net)
        w = other[3].weight.data
        scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        other[3].weight.data = torch.clamp(torch.round(w / scale), -(2 ** (bits - 1) - 1),
                                           2 ** (bits - 1) - 1) * scale
        out = other(x).detach().double()
        expected = float(((out - ref_out) ** 2).sum() / (ref_out ** 2).sum())
        assert table["3"][bits] == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert table["3"][2] > table["3"][4] > table["3"][8] > 0 and table["3"][FLOAT] == 0
    torch.testing.assert_close(net(x), mlp.module(x))  # the weight is restored


def test_allocate_exact_greedy_and_unreachable(monkeypatch):
    sens = {"a": {FLOAT: 0.0, 8: 0.01, 4: 0.1, 2: 1.0},
            "b": {FLOAT: 0.0, 8: 0.001, 4: 0.002, 2: 0.05}}
    sizes = {"a": {FLOAT: 400, 8: 110, 4: 60, 2: 35},
             "b": {FLOAT: 800, 8: 210, 4: 110, 2: 60}}
    assign, met, method = allocate_bits(sens, sizes, 200)
    assert (assign, met, method) == ({"a": 8, "b": 2}, True, "exact")  # 170 bytes, cost 0.06
    assign, met, _ = allocate_bits(sens, sizes, 10)
    assert not met and assign == {"a": 2, "b": 2}  # unreachable: the smallest is kept
    monkeypatch.setattr(mixed, "EXACT_LIMIT", 0)
    assign, met, method = allocate_bits(sens, sizes, 200)
    assert method == "greedy" and met
    assert sum(sizes[n][b] for n, b in assign.items()) <= 200
    assert sum(sens[n][b] for n, b in assign.items()) >= 0.06 - 1e-12


def test_size_policy_meets_budget_and_stores_codes(mlp, digits):
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    cfg = MixedPrecisionConfig(policy="size", size_ratio=0.15)
    q, rec = stage_on(mixed_precision, mlp.module, cfg, digits)
    ach, asked = rec.details["achieved"], rec.details["asked"]
    assert ach["met"] and ach["weight_bytes"] <= asked["weight_bytes"]
    assert ach["weight_bytes"] == sum(r["bytes"] for r in rec.details["layers"].values())
    assert ach["accuracy"] == pytest.approx(100 * evaluate(q, digits.x_test, digits.y_test))
    assert ach["accuracy_drop"] < 10
    kinds = {n: type(q.get_submodule(n)) for n in rec.details["layers"]}
    for n, row in rec.details["layers"].items():
        assert set(row["sensitivity"]) == {"float", "8", "4", "2"}
        if row["bits"] in (2, 4):
            assert kinds[n] is PackedQuantLayer
        elif row["bits"] == 8:
            assert kinds[n] is QuantLayer
    # Stored bytes of packed layers match the reported ones.
    for n, row in rec.details["layers"].items():
        m = q.get_submodule(n)
        if isinstance(m, PackedQuantLayer):
            assert m.weight_packed.numel() + 4 * m.weight_fq.scale.numel() == row["bytes"]
    assert "weights-only" in rec.details["activations"]
    for k, v in mlp.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_unreachable_budget_says_so(mlp, digits):
    q, rec = stage_on(mixed_precision, mlp.module, MixedPrecisionConfig(size_bytes=100), digits)
    assert not rec.details["achieved"]["met"]
    assert all(r["bits"] == 2 for r in rec.details["layers"].values())
    assert any(s["what"] == "budget" and "not reachable" in s["why"] for s in rec.skipped)


def test_fallback_keeps_sensitive_layers_in_float(mlp, digits):
    cfg = MixedPrecisionConfig(policy="fallback", bits=[2], max_accuracy_drop=3.0, act_bits=8)
    q, rec = stage_on(mixed_precision, mlp.module, cfg, digits)
    ach, trail = rec.details["achieved"], rec.details["trail"]
    # chosen on a validation slice of the training split; the test split only reports
    assert ach["met"] and ach["validation_accuracy_drop"] <= 3.0
    assert ach["accuracy_drop"] < 10.0
    assert trail[0]["float_layers"] == [] and trail[0]["accuracy_drop"] > 3.0
    assert len(trail) < 4  # some layers stay quantized
    assert trail[-1]["accuracy_drop"] == pytest.approx(ach["validation_accuracy_drop"])
    floats = [n for n, r in rec.details["layers"].items() if r["bits"] is None]
    assert sorted(floats) == sorted(trail[-1]["float_layers"])
    # The layers moved first are the most sensitive at 2 bits.
    sens = {n: r["sensitivity"]["2"] for n, r in rec.details["layers"].items()}
    assert sens[trail[1]["float_layers"][0]] == max(sens.values())
    assert any(isinstance(m, nn.Linear) for m in q.modules())


def test_stage_and_artifact_round_trip(digits, tmp_path):
    zoo = load_zoo("lenet300", digits)
    spec = STAGES.get("mixed_precision")
    cfg = spec.config(policy="size", size_ratio=0.2, act_bits=8)
    out, rec = spec.apply(zoo, cfg, StageContext(data=digits, teacher=zoo, progress=False))
    kinds = [t["kind"] for t in out.arch["transforms"]]
    assert set(kinds) <= {"quant_layers", "packed_quant"} and kinds
    save_artifact(out, tmp_path / "m")
    back = load_artifact(tmp_path / "m")
    x = digits.x_test[:32]
    torch.testing.assert_close(back.module(x), out.module(x), rtol=0, atol=0)


def test_bad_configs_and_data(mlp, digits):
    with pytest.raises(ValidationError):
        MixedPrecisionConfig(policy="size")
    with pytest.raises(ValidationError):
        MixedPrecisionConfig(size_ratio=0.1, bits=[3])
    with pytest.raises(ConfigError, match="no Linear/Conv"):
        stage_on(mixed_precision, nn.Sequential(nn.Flatten()), MixedPrecisionConfig(size_ratio=0.1),
                 digits)
    const = DataBundle("c", torch.ones_like(digits.x_train), digits.y_train, digits.x_test,
                       digits.y_test, 10)
    with pytest.raises(DataError, match="constant"):
        stage_on(mixed_precision, mlp.module, MixedPrecisionConfig(size_ratio=0.1), const)
