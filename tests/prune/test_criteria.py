"""Importance criteria against float64 hand computations over every coupled parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.prune._structured_models import ConvNet, init_bn
from torch import nn

from slimkit.graph.dependency import Group, build_dependency_graph
from slimkit.prune.allocate import ALLOCATORS, AllocRequest, round_keep, search_ratio
from slimkit.prune.criteria import CRITERIA, ScoreInputs, taylor_grads

X = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module")
def net_and_group() -> tuple[nn.Module, Group]:
    torch.manual_seed(0)
    net = init_bn(ConvNet())
    group = next(g for g in build_dependency_graph(net, X).groups if g.root == "conv1")
    return net, group


def _inputs(net: nn.Module, group: Group, grads=None) -> ScoreInputs:
    return ScoreInputs(group, dict(net.named_parameters()), dict(net.named_modules()), grads, 0)


def _hand(net: nn.Module, per_tensor) -> np.ndarray:
    """conv1 group by hand: conv1 rows + bias, bn1 weight/bias, conv2 input columns."""
    p = {k: v.detach().double() for k, v in net.named_parameters()}
    slices = [p["conv1.weight"].reshape(16, -1), p["conv1.bias"].reshape(16, 1),
              p["bn1.weight"].reshape(16, 1), p["bn1.bias"].reshape(16, 1),
              p["conv2.weight"].transpose(0, 1).reshape(16, -1)]
    total = np.zeros(16)
    for s in slices:
        v = per_tensor(s).numpy()
        total += v / v.mean()
    return total


def test_group_members_are_every_coupled_parameter(net_and_group):
    _, group = net_and_group
    assert {(m.param, m.dim) for m in group.members} == {
        ("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0),
        ("bn1.running_mean", 0), ("bn1.running_var", 0), ("conv2.weight", 1)}


@pytest.mark.parametrize("name,fn", [
    ("l1", lambda s: s.abs().sum(1)),
    ("l2", lambda s: s.pow(2).sum(1).sqrt()),
    ("fpgm", lambda s: torch.stack([(s - s[i]).pow(2).sum(1).sqrt().sum()
                                    for i in range(len(s))])),
])
def test_norm_criteria_match_float64(net_and_group, name, fn):
    net, group = net_and_group
    got = CRITERIA.get(name)(_inputs(net, group))
    np.testing.assert_allclose(got, _hand(net, fn), rtol=1e-9)


def test_bn_scale_is_gamma(net_and_group):
    net, group = net_and_group
    gamma = net.bn1.weight.detach().double().abs().numpy()
    np.testing.assert_allclose(CRITERIA.get("bn_scale")(_inputs(net, group)),
                               gamma / gamma.mean(), rtol=1e-12)


def test_taylor_is_grad_times_weight_accumulated(net_and_group):
    net, group = net_and_group
    y = torch.tensor([0, 1, 2, 3])
    batches = [(X[0][:2], y[:2]), (X[0][2:], y[2:])]
    grads = taylor_grads(net, batches)
    hand = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in net.named_parameters()}
    for x, t in batches:
        net.zero_grad()
        nn.functional.cross_entropy(net.eval()(x), t).backward()
        for k, v in net.named_parameters():
            hand[k] += (v.grad * v.detach()).abs().double()
    net.zero_grad(set_to_none=True)
    for k in hand:
        torch.testing.assert_close(grads[k], hand[k], rtol=1e-6, atol=1e-12)
    got = CRITERIA.get("taylor")(_inputs(net, group, grads))
    order = ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    ref = sum((hand[k].reshape(16, -1).sum(1) / hand[k].reshape(16, -1).sum(1).mean()).numpy()
              for k in order)
    c2 = hand["conv2.weight"].transpose(0, 1).reshape(16, -1).sum(1)
    np.testing.assert_allclose(got, ref + (c2 / c2.mean()).numpy(), rtol=1e-9)


def test_random_is_seeded(net_and_group):
    net, group = net_and_group
    a = CRITERIA.get("random")(_inputs(net, group))
    b = CRITERIA.get("random")(_inputs(net, group))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == group.size


def test_round_keep():
    assert round_keep(13.2, 32, 8) == 16
    assert round_keep(2.0, 32, 8) == 8  # never below round_to
    assert round_keep(0.2, 5, 8) == 1  # smaller than round_to: at least one
    assert round_keep(31.0, 30, 8) == 30
    # a layer left whole stays whole, and rounding never removes more than asked
    assert round_keep(27.0, 27, 8) == 27 and round_keep(50.0, 50, 8) == 50
    assert round_keep(17.0, 50, 8) == 24 and round_keep(16.0, 50, 8) == 16


def test_global_removes_the_lowest_scores_across_groups():
    req = AllocRequest({0: 4, 1: 4}, {0: np.array([1.0, 1.0, 1.0, 1.0]),
                                      1: np.array([0.01, 0.02, 5.0, 5.0])}, 0.25)
    assert ALLOCATORS.get("global")(req) == {0: 4, 1: 2}
    req.max_layer_ratio = 0.25
    assert ALLOCATORS.get("global")(req) == {0: 3, 1: 3}
    assert ALLOCATORS.get("uniform")(AllocRequest({0: 10}, {}, 0.3)) == {0: 7}


def test_search_ratio_finds_the_smallest_ratio_reaching_the_target():
    res = search_ratio(lambda r: 1 - r, 0.6, 0.9, iters=20, tol=1e-4)
    assert res.reached and res.achieved <= 0.6 and res.ratio == pytest.approx(0.4, abs=2e-3)
    miss = search_ratio(lambda r: 1 - r / 2, 0.2, 0.9)
    assert not miss.reached and miss.ratio == 0.9
