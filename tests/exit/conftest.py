"""Fixtures of the early-exit tests."""

from __future__ import annotations

import pytest
from tests.exit._models import class_data, zoo_model

from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel


@pytest.fixture(scope="module")
def trained_resnet() -> tuple[SlimModel, DataBundle]:
    """A narrow ResNet-20 trained briefly on the quadrant data (its final head is good)."""
    from slimkit.train.config import TrainConfig
    from slimkit.train.loop import fit

    data = class_data()
    model = zoo_model("resnet20")
    fit(model.module, data, TrainConfig(epochs=4, lr=1e-2, batch_size=32), progress=False)
    return model, data


