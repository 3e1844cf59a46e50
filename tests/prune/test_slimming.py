"""Network Slimming: L1 on normalization scales before pruning with the bn_scale criterion."""

from __future__ import annotations

import copy

import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.prune.slimming import NormScaleL1, SlimmingConfig, slimming_train
from slimkit.prune.structured import StructuredPruneConfig, structured_prune


def test_penalty_is_cross_entropy_plus_l1_of_every_norm_scale():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.uniform_(-2, 2)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    loss, logits, parts = NormScaleL1(0.1)(net, x, y)
    l1 = net[1].weight.double().abs().sum() + net[5].weight.double().abs().sum()
    want = nn.functional.cross_entropy(net(x).double(), y) + 0.1 * l1
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert parts["scale_l1"] == pytest.approx(float(l1.detach()), rel=1e-6)


def test_slimming_shrinks_scales_and_feeds_bn_scale_pruning(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    before = copy.deepcopy(model.state_dict())
    train = {"epochs": 1, "max_steps": 30, "lr": 1e-2}
    plain = copy.deepcopy(model)
    slimming_train(plain, SlimmingConfig(penalty=1e-9, train=train), digits)
    cfg = StructuredPruneConfig(ratio=0.3, criterion="bn_scale",
                                slimming={"penalty": 3e-2, "train": train})
    pruned, rec = stage_on(structured_prune, model, cfg, data=digits)
    info = rec.details["slimming"]
    bns = [m.weight.abs().mean() for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert info["mean_abs_scale_after"] < float(torch.stack(bns).mean()) - 0.05
    assert info["mean_abs_scale_after"] < info["mean_abs_scale_before"]
    assert rec.details["params"]["after"] < rec.details["params"]["before"]
    for k, v in model.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(pruned.eval()(digits.x_test[:4])).all()


def test_slimming_needs_norm_layers_and_data(mlp, digits):
    with pytest.raises(ConfigError, match="normalization layers"):
        slimming_train(copy.deepcopy(mlp.module), SlimmingConfig(), digits)
    with pytest.raises(ConfigError, match="give training data"):
        slimming_train(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), SlimmingConfig(), None)
