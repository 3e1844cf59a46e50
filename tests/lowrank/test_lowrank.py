"""The lowrank technique: plan/replay, input untouched, records, rules and errors."""

import json

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.data import DataBundle
from slimkit.distill.config import DistillConfig
from slimkit.distill.run import FinetuneConfig
from slimkit.lowrank import LowRankConfig, apply_lowrank, lowrank, plan_lowrank
from slimkit.measure import count_flops
from slimkit.train.loop import evaluate


class Small(nn.Module):
    """Conv (stride 2), BN, depthwise conv, embedding-free MLP head; input (1, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def small() -> nn.Module:
    torch.manual_seed(0)
    return Small().eval()


X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("conv", ["tucker2", "cp", "spatial", "svd"])
def test_plan_json_round_trip_replays_identically(small: nn.Module, conv: str):
    cfg = LowRankConfig(conv=conv, rank="ratio", ratio=0.4, n_iter=30)
    out, rec = stage_on(lowrank, small, cfg, example_inputs=(X[:1],))
    plan = json.loads(json.dumps(rec.details["plan"]))
    assert plan == plan_lowrank(small, cfg)  # planning is deterministic
    replay = apply_lowrank(small, plan)
    out.eval()
    torch.testing.assert_close(replay(X), out(X), rtol=0, atol=0)
    assert replay.state_dict().keys() == out.state_dict().keys()
    assert {"conv2.0.weight", "fc1.1.bias", "dw.weight"} <= set(out.state_dict())
    assert isinstance(out.conv2, nn.Sequential) and isinstance(out.dw, nn.Conv2d)
    # Lossy but close: 40% of the weights keep the logits correlated with the original.
    cos = nn.functional.cosine_similarity(out(X).flatten(), small(X).flatten(), dim=0)
    assert cos > 0.5


def test_input_model_is_untouched(small: nn.Module):
    small.train()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    types = [type(m) for m in small.modules()]
    cfg = LowRankConfig(rank="sensitivity", tolerance=0.3, check_latency=True,
                        latency_repeats=3)
    y = torch.arange(len(X)) % 2
    data = DataBundle("test", X, y, X, y, num_classes=2)
    stage_on(lowrank, small, cfg, data=data)
    plan_lowrank(small, cfg, calib_x=X)
    assert [type(m) for m in small.modules()] == types
    assert all(m.training for m in small.modules())
    for k, v in small.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_record_counts_params_flops_and_errors(small: nn.Module):
    cfg = LowRankConfig(ranks={"conv2": [6, 4], "fc1": [12]}, include=["conv2", "fc1"])
    out, rec = stage_on(lowrank, small, cfg, example_inputs=(X[:1],))
    conv2, fc1 = rec.details["layers"]["conv2"], rec.details["layers"]["fc1"]
    # Analytic counts: Tucker-2 = 1x1 (8->4) at 8x8, 3x3 core (4->6) and 1x1 (6->16) at 4x4.
    assert conv2["params_after"] == 8 * 4 + 4 * 6 * 9 + 6 * 16 + 16
    assert conv2["flops_before"] == 2 * 16 * 8 * 9 * 16
    assert conv2["flops_after"] == 2 * (8 * 4 * 64 + 4 * 6 * 9 * 16 + 6 * 16 * 16)
    assert fc1["params_after"] == 12 * (256 + 64) + 64
    assert (fc1["flops_before"], fc1["flops_after"]) == (2 * 256 * 64, 2 * 12 * 320)
    per = count_flops(out, (X[:1],))["per_layer"]
    assert fc1["flops_after"] == per["fc1.0"]["flops"] + per["fc1.1"]["flops"]
    assert sum(p.numel() for p in out.fc1.parameters()) == fc1["params_after"]
    totals = rec.details["totals"]
    assert totals["model_params_before"] - totals["model_params_after"] == \
        totals["factorized_params_before"] - totals["factorized_params_after"]
    assert 0 < conv2["rel_error"] < 1 and len(rec.changed) == 2
    assert {"what": "conv1", "why": "not matched by include"} in rec.skipped


def test_never_larger_rule_uses_the_margin():
    net = nn.Sequential(nn.Linear(10, 10))
    ok = plan_lowrank(net, LowRankConfig(ranks={"0": [4]}))  # 80 < 0.9 * 100
    assert ok["layers"]["0"]["rank"] == [4] and "reason" not in ok["layers"]["0"]
    for rank, margin in ((5, 0.1), (4, 0.2)):  # 100 >= 90; 80 >= 80
        entry = plan_lowrank(net, LowRankConfig(ranks={"0": [rank]}, margin=margin))["layers"]["0"]
        assert "would not be smaller" in entry["reason"]
        assert entry["params_after"] == entry["params_before"] == 110
    out, rec = stage_on(lowrank, net, LowRankConfig(energy=1.0))
    assert isinstance(out[0], nn.Linear) and "would not be smaller" in rec.skipped[0]["why"]


def test_bad_ranks_name_the_layer_and_its_maximum(small: nn.Module):
    with pytest.raises(ConfigError, match=r"rank \[11\] of layer 'fc2'.*maximum rank is \[10\]"):
        plan_lowrank(small, LowRankConfig(ranks={"fc2": [11]}))
    with pytest.raises(ConfigError, match=r"'conv2' \(tucker2\) takes a rank \[r_out, r_in\]"):
        plan_lowrank(small, LowRankConfig(ranks={"conv2": [3]}))
    with pytest.raises(ConfigError, match="'fc3'.*Did you mean 'fc[12]'"):
        plan_lowrank(small, LowRankConfig(ranks={"fc3": [3]}))
    plan = plan_lowrank(small, LowRankConfig(ranks={"fc2": [3]}, include=["fc2"]))
    plan["layers"]["fc2"]["rank"] = [64]
    with pytest.raises(ConfigError, match="'fc2'.*maximum rank is \\[10\\]"):
        apply_lowrank(small, plan)


@pytest.mark.parametrize("bad", [{"energy": 0.0}, {"energy": 1.5}, {"ratio": 1.0},
                                 {"margin": -0.1}, {"ranks": {"fc1": [0]}}, {"rnak": "ratio"},
                                 {"rank": "entropy"}])
def test_config_validation(bad: dict):
    with pytest.raises(ValidationError):
        LowRankConfig(**bad)


def test_layers_that_cannot_be_factorized_are_skipped_with_the_reason():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(64, 32),
                        nn.Unflatten(1, (1, 32)), nn.Conv1d(1, 4, 3, groups=1))
    cfg = LowRankConfig(include=["0", "2"], ranks={"2": [4]})
    out, rec = stage_on(lowrank, net, cfg, example_inputs=(torch.randint(0, 20, (2, 4)),))
    why = {s["what"]: s["why"] for s in rec.skipped}
    assert "Embedding layers cannot be factorized" in why["0"]
    assert isinstance(out[0], nn.Embedding) and isinstance(out[2], nn.Sequential)
    plan = plan_lowrank(net, LowRankConfig(linear="none", include=["2"]))
    assert "set to 'none'" in plan["layers"]["2"]["reason"]
    with pytest.raises(ConfigError, match="both 'none'"):
        plan_lowrank(net, LowRankConfig(linear="none", conv="none"))


def test_latency_check_keeps_only_layers_measured_faster(small: nn.Module):
    cfg = LowRankConfig(rank="ratio", ratio=0.2, check_latency=True, latency_repeats=5)
    plan = plan_lowrank(small, cfg, calib_x=X)
    timed = [e for e in plan["layers"].values() if "latency" in e]
    assert timed
    for e in timed:
        lat = e["latency"]
        assert lat["dense_ms"] > 0 and lat["factorized_ms"] > 0 and lat["batch"] == 1
        assert ("reason" in e) == (lat["factorized_ms"] >= lat["dense_ms"])
        if "reason" in e:
            assert "not faster" in e["reason"]
    with pytest.raises(ConfigError, match="check_latency needs an input batch"):
        plan_lowrank(small, cfg)


def test_finetune_distils_from_the_original(mlp, digits):
    base = evaluate(mlp.module, digits.x_test, digits.y_test)
    cfg = LowRankConfig(rank="ratio", ratio=0.15, exclude=["5"])  # keep the classifier dense
    raw, _ = stage_on(lowrank, mlp.module, cfg, data=digits)
    ft = FinetuneConfig(epochs=1, lr=5e-3, distill=DistillConfig())
    tuned, rec = stage_on(lowrank, mlp.module, cfg.model_copy(update={"finetune": ft}), data=digits)
    acc_raw = evaluate(raw, digits.x_test, digits.y_test)
    acc_ft = evaluate(tuned, digits.x_test, digits.y_test)
    assert len(rec.details["finetune"]["epochs"]) == 1
    assert acc_ft > acc_raw + 0.05 and acc_ft > base - 0.1
    with pytest.raises(ConfigError, match="finetune needs data"):
        stage_on(lowrank, mlp.module, cfg.model_copy(update={"finetune": ft}))


def test_sensitivity_skips_layers_the_calibration_batch_never_reaches():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    plan = plan_lowrank(WithSpare(), LowRankConfig(rank="sensitivity", tolerance=0.9),
                        calib_x=torch.randn(8, 32))
    assert plan["layers"]["used"]["rank"] and "not called" in plan["layers"]["spare"]["reason"]
