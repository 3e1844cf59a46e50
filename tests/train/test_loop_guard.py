"""An epoch that gives no optimizer step stops with a clear error instead of looping forever."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.errors import DataError
from slimkit.data.stream import StreamData
from slimkit.train.loop import TrainConfig, fit


def test_batches_without_labels_stop_with_one_clear_line():
    x = torch.randn(8, 4)
    batches = [(x[:4], torch.zeros(0)), (x[4:], torch.zeros(0))]  # labels of length 0
    data = StreamData("unlabelled", train=batches, test=batches, val=batches, num_classes=2)
    with pytest.raises(DataError, match="training on 'unlabelled': an epoch gave no step"):
        fit(nn.Linear(4, 2), data, TrainConfig(max_steps=5), progress=False)
