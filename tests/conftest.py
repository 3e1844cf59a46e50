"""Shared fixtures: a small real dataset (sklearn digits) and a small trained MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel
from slimkit.train.loop import TrainConfig, fit


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    """sklearn's 8x8 digits (real data), a fixed split, as (N, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return DataBundle("digits-fixture", x[:1400], y[:1400], x[1400:], y[1400:], 10)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="session")
def trained_mlp_state(digits: DataBundle) -> dict:
    net = make_mlp()
    fit(net, digits, TrainConfig(epochs=4, lr=3e-3), progress=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def mlp(trained_mlp_state: dict) -> SlimModel:
    """A freshly built copy of the trained MLP (tests may mutate it)."""
    net = make_mlp()
    net.load_state_dict(trained_mlp_state)
    net.eval()
    return SlimModel(module=net, input_shape=(1, 8, 8), name="mlp", num_classes=10)
