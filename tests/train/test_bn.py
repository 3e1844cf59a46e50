"""BatchNorm re-estimation against statistics computed directly in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimkit.core.errors import ConfigError, DataError
from slimkit.train import recalibrate_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    for bn in (net[1], net[6]):  # stale statistics, as after pruning
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
    return net.double()


def _bn_inputs(net: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """What each BatchNorm sees on the batch ``x`` while the statistics are gathered: the
    first normalizes with the batch's own (biased) statistics, dropout is off."""
    with torch.no_grad():
        conv = net[0](x)
        normed = F.batch_norm(conv, None, None, net[1].weight, net[1].bias, training=True)
        return [conv, net[5](net[4](net[2](normed)))]


def _stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, t.dim())]
    return t.mean(dims), t.var(dims, unbiased=True)


def test_one_batch_gives_that_batch_s_mean_and_unbiased_variance():
    net = _net().train()
    net[1].eval()  # re-estimated too; its eval flag is restored
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    weights = {k: v.clone() for k, v in net.named_parameters()}
    assert recalibrate_batchnorm(net, (x,), batch_size=16) == 2
    mean, var = _stats(_bn_inputs(net, x)[0])
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-12, atol=1e-12)
    mean, var = _stats(_bn_inputs(net, x)[1])
    torch.testing.assert_close(net[6].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[6].running_var, var, rtol=1e-12, atol=1e-12)
    assert [m.training for m in net] == [True, False, True, True, True, True, True]
    assert net[1].momentum == net[6].momentum == 0.1
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())


def test_full_batches_are_averaged_and_a_short_last_one_is_left_out():
    net = _net().eval()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    recalibrate_batchnorm(net, (x,), batch_size=16)  # batches 0:16 and 16:32; 32:40 left out
    conv = net[0](x).detach()
    parts = [_stats(conv[:16]), _stats(conv[16:32])]
    torch.testing.assert_close(net[1].running_mean, (parts[0][0] + parts[1][0]) / 2,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, (parts[0][1] + parts[1][1]) / 2,
                               rtol=1e-12, atol=1e-12)
    assert int(net[1].num_batches_tracked) == 2 and not net.training


def test_a_model_without_batchnorm_is_left_alone():
    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm(net, (torch.randn(4, 3),)) == 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and net.training


class _TwoInputs(nn.Module):
    """Two inputs; ``unused`` is never called and ``free`` keeps no running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, momentum=None)
        self.free = nn.BatchNorm1d(3, track_running_stats=False)
        self.unused = nn.BatchNorm1d(3)
        self.unused.running_mean.fill_(5.0)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.free(self.bn(a * b))


def test_several_inputs_unreached_and_untracked_layers_and_momentum_none():
    net = _TwoInputs().double()
    a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    # batch_size 1 would leave BatchNorm1d one sample: it is raised to 2 (three full batches)
    assert recalibrate_batchnorm(net, (a, b), batch_size=1) == 1
    parts = [_stats((a * b)[i:i + 2]) for i in (0, 2, 4)]
    torch.testing.assert_close(net.bn.running_mean, sum(p[0] for p in parts) / 3,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.bn.running_var, sum(p[1] for p in parts) / 3,
                               rtol=1e-12, atol=1e-12)
    assert net.bn.momentum is None and net.free.running_mean is None
    assert int(net.unused.num_batches_tracked) == 0
    torch.testing.assert_close(net.unused.running_mean, torch.full((3,), 5.0, dtype=torch.float64))


def test_a_failing_forward_restores_every_statistic():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(net, (torch.randn(4, 2, 8, 8, dtype=torch.float64),))  # 2 channels
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net[1].momentum == 0.1


def test_bad_batch_size_and_too_few_samples_are_named():
    net = _net()
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        recalibrate_batchnorm(net, (torch.randn(4, 1, 8, 8, dtype=torch.float64),), batch_size=0)
    with pytest.raises(DataError, match="at least 2 samples"):
        recalibrate_batchnorm(net, (torch.randn(1, 1, 8, 8, dtype=torch.float64),))
