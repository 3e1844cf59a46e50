"""Rank rules: energy, ratio, EVBMF and output sensitivity, against direct computations."""

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.lowrank import FACTORIZERS, RANK_RULES, LowRankConfig, evbmf, plan_lowrank
from slimkit.lowrank.ranks import energy_rank


def test_rank_rules_registry_and_factorizers_registry():
    assert RANK_RULES.names() == ["energy", "ratio", "sensitivity", "vbmf"]
    assert FACTORIZERS.names() == ["cp", "spatial", "svd", "tucker2"]
    with pytest.raises(ConfigError, match="unknown factorizer 'tuker2'.*'tucker2'"):
        FACTORIZERS.get("tuker2")


def test_energy_rank_matches_a_direct_count():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    total = np.sum(s**2)
    for energy in (0.1, 0.5, 0.9, 0.97, 0.999, 1.0):
        direct = next(r for r in range(1, 6) if np.sum(s[:r] ** 2) >= energy * total - 1e-12)
        assert energy_rank(s, energy) == direct
    assert energy_rank(s, 25 / total) == 1  # exactly the first component's share


def test_energy_rule_on_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    s = np.linalg.svd(layer.weight.detach().double().numpy(), compute_uv=False)
    plan = plan_lowrank(nn.Sequential(layer), LowRankConfig(energy=0.6, margin=0.0))
    r = plan["layers"]["0"]["rank"][0]
    share = np.cumsum(s**2) / np.sum(s**2)
    assert share[r - 1] >= 0.6 > share[r - 2]


def test_ratio_rule_keeps_at_most_the_ratio_and_is_the_largest_such_rank():
    net = nn.Sequential(nn.Linear(64, 48), nn.Conv2d(16, 24, 3))
    cfg = LowRankConfig(rank="ratio", ratio=0.3)
    plan = plan_lowrank(net, cfg)
    lin, conv = plan["layers"]["0"], plan["layers"]["1"]
    assert lin["rank"] == [int(0.3 * 64 * 48 / (64 + 48))]
    assert lin["weight_params_after"] <= 0.3 * 64 * 48 < (lin["rank"][0] + 1) * 112
    fac, shape = FACTORIZERS.get("tucker2"), (24, 16, 3, 3)
    assert conv["weight_params_after"] == fac.weight_params(shape, conv["rank"])
    assert conv["weight_params_after"] <= 0.3 * 24 * 16 * 9
    bigger = [c for c in fac.candidates(shape) if c > conv["rank"]][0]
    assert fac.weight_params(shape, bigger) > 0.3 * 24 * 16 * 9


def test_evbmf_recovers_a_planted_rank_and_the_noise_variance():
    rng = np.random.default_rng(0)
    for rows, cols, rank in [(30, 50, 4), (60, 40, 7), (20, 300, 3)]:
        y = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))
        y += 0.1 * rng.normal(size=(rows, cols))
        found = evbmf(y)
        assert found.rank == rank
        assert found.sigma2 == pytest.approx(0.01, rel=0.15)
        assert found.singular_values[rank - 1] > found.threshold > found.singular_values[rank]
    assert evbmf(rng.normal(size=(30, 50))).rank == 0
    # With the noise variance given, the threshold is sqrt(M sigma2 (1 + t)(1 + alpha / t)).
    alpha, tau = 30 / 50, 2.5129 * np.sqrt(30 / 50)
    given = evbmf(rng.normal(size=(50, 30)), sigma2=1.0)
    assert given.threshold == pytest.approx(np.sqrt(50 * (1 + tau) * (1 + alpha / tau)))


def test_vbmf_rule_finds_the_multilinear_ranks_of_a_planted_kernel():
    rng = np.random.default_rng(1)
    core = rng.normal(size=(5, 3, 3, 3))
    u_out, u_in = rng.normal(size=(32, 5)), rng.normal(size=(24, 3))
    w = np.einsum("abhw,oa,ib->oihw", core, u_out, u_in) + 0.01 * rng.normal(size=(32, 24, 3, 3))
    layer = nn.Conv2d(24, 32, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
    plan = plan_lowrank(nn.Sequential(layer), LowRankConfig(rank="vbmf"))
    assert plan["layers"]["0"]["rank"] == [5, 3]
    assert plan["layers"]["0"]["rel_error"] < 0.05
    cp = plan_lowrank(nn.Sequential(layer), LowRankConfig(rank="vbmf", conv="cp"))
    assert cp["layers"]["0"]["rank"] == [5]  # the larger unfolding rank


def test_sensitivity_picks_the_smallest_rank_within_tolerance():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    with torch.no_grad():  # a decaying spectrum, as trained layers have
        u, _, vt = torch.linalg.svd(layer.weight, full_matrices=False)
        layer.weight.copy_(u @ torch.diag(0.8 ** torch.arange(24.0)) @ vt)
    x = torch.randn(64, 32) @ torch.diag(torch.linspace(2.0, 0.05, 32))  # anisotropic inputs
    cfg = LowRankConfig(rank="sensitivity", tolerance=0.2, margin=0.0)
    plan = plan_lowrank(nn.Sequential(layer), cfg, calib_x=x)
    r = plan["layers"]["0"]["rank"][0]
    w, xd = layer.weight.detach().double().numpy(), x.double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)

    def out_err(k: int) -> float:
        w_k = (u[:, :k] * s[:k]) @ vt[:k]
        return np.linalg.norm(xd @ (w - w_k).T) / np.linalg.norm(xd @ w.T)

    assert out_err(r) <= 0.2 < out_err(r - 1)
    with pytest.raises(ConfigError, match="needs a calibration batch.*'0'"):
        plan_lowrank(nn.Sequential(layer), cfg)


def test_sensitivity_skips_a_layer_no_allowed_rank_can_fit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    plan = plan_lowrank(net, LowRankConfig(rank="sensitivity", tolerance=1e-4),
                        calib_x=torch.randn(8, 16))
    assert "exceeds tolerance" in plan["layers"]["0"]["reason"]
