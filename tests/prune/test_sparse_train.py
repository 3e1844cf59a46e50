import math

import pytest
import torch
from tests._stages import stage_on

from slimkit.distill.run import FinetuneConfig
from slimkit.prune.sparse_train import (
    SparseTrainConfig,
    drop_and_grow,
    drop_fraction_at,
    erk_densities,
    sparse_train,
)
from slimkit.train import evaluate


def test_erk_densities_meet_the_budget_and_favour_small_layers():
    shapes = {"big": (300, 784), "mid": (100, 300), "small": (10, 100)}
    d = erk_densities(shapes, 0.1)
    kept = sum(d[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.1 * sum(math.prod(s) for s in shapes.values()))
    assert d["big"] < d["mid"] < d["small"] <= 1.0
    # a layer that would exceed density 1 is made dense and the rest re-solved
    d2 = erk_densities({"a": (1000, 1000), "b": (2, 2)}, 0.5)
    assert d2["b"] == 1.0 and d2["a"] == pytest.approx((0.5 * 1_000_004 - 4) / 1_000_000)


def test_drop_fraction_is_cosine_decayed():
    assert drop_fraction_at(0, 0.3, 100) == pytest.approx(0.3)
    assert drop_fraction_at(50, 0.3, 100) == pytest.approx(0.15)
    assert drop_fraction_at(100, 0.3, 100) == pytest.approx(0.0)


def test_drop_and_grow_by_hand():
    w = torch.tensor([0.9, -0.1, 0.0, 0.5, 0.0, 0.0, -0.3, 0.0])
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    grad = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.9, 0.1, 0.0, 0.5])
    new, k = drop_and_grow(w, mask, grad, 0.5)  # 4 active -> exchange 2
    assert k == 2
    # dropped: the two smallest active magnitudes (-0.1, -0.3); grown: largest |grad| (4, 7)
    assert new.tolist() == [True, False, False, True, True, False, False, True]
    assert int(new.sum()) == int(mask.sum())
    assert w[4] == 0 and w[7] == 0  # regrown weights start at zero


def test_sparse_training_keeps_sparsity_and_learns(digits):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))  # freshly initialized
    cfg = SparseTrainConfig(sparsity=0.8, update_every=10, drop_fraction=0.3,
                            train=FinetuneConfig(epochs=4, batch_size=64, lr=1e-2))
    trained, rec = stage_on(sparse_train, net, cfg, digits)
    updates = rec.details["updates"]
    assert len(updates) >= 3 and all(u["exchanged"] > 0 for u in updates)
    fractions = [u["fraction"] for u in updates]
    assert fractions == sorted(fractions, reverse=True)
    layers = rec.details["layers"]
    active = sum(v["active"] for v in layers.values())
    assert abs(active - 0.2 * (64 * 64 + 64 * 10)) <= len(layers)  # ERK budget, rounded
    for name, info in layers.items():
        target = rec.details["target_density"][name]
        assert info["active"] == round(target * info["numel"])  # constant across updates
        w = dict(trained.named_modules())[name].weight
        assert int((w != 0).sum()) <= info["active"]
    assert evaluate(trained, digits.x_test, digits.y_test) > 0.85
    assert torch.count_nonzero(net[1].weight) == net[1].weight.numel()  # input untouched
