"""Small models and data for the early-exit tests (imported by the tests and conftest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.exit.model import EarlyExitModel
from slimkit.exit.plan import build_plan
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel

ZOO = {
    "resnet20": ({"input_shape": (1, 8, 8), "num_classes": 4, "width": 4},
                 ["layer1", "layer2.2"]),
    "vit": ({"input_shape": (1, 8, 8), "num_classes": 4, "dim": 8, "depth": 3, "heads": 2,
             "patch_size": 4}, ["blocks.0", "blocks.1"]),
    "text_encoder": ({"input_shape": (10,), "num_classes": 4, "dim": 8, "depth": 3,
                      "heads": 2, "input_dtype": "int64", "vocab_size": 30},
                     ["blocks.0", "blocks.1"]),
    "mobilenetv2": ({"input_shape": (3, 16, 16), "num_classes": 4, "width_mult": 0.25},
                    ["features.3", "features.6"]),
}


def zoo_model(name: str) -> SlimModel:
    torch.manual_seed(0)
    return load_zoo(name, **ZOO[name][0])


def inputs(model: SlimModel, n: int, seed: int = 0) -> torch.Tensor:
    return model.example_inputs(n, seed=seed)[0]


def wrapped(name: str, dtype: torch.dtype = torch.float64) -> tuple[EarlyExitModel, SlimModel]:
    """The zoo model with random exit heads at its two listed blocks, in ``dtype``."""
    model = zoo_model(name)
    module = model.module.eval()
    x = inputs(model, 3)
    plan = build_plan(module, ZOO[name][1], (x,), 4, "max_softmax", "auto")
    torch.manual_seed(1)
    ee = EarlyExitModel(module, plan).to(dtype).eval()
    with torch.no_grad():  # random heads give near-uniform softmax: sharpen them
        for head in ee.heads:
            head.fc.weight.mul_(30.0)
    return ee, model


def class_data(n_train: int = 192, n_test: int = 64, shape: tuple[int, ...] = (1, 8, 8),
               seed: int = 0) -> DataBundle:
    """Four classes told apart by which image quadrant is bright, plus noise."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=gen)
        x = 0.3 * torch.randn((n, *shape), generator=gen)
        h, w = shape[-2] // 2, shape[-1] // 2
        for i, c in enumerate(y.tolist()):
            r, s = divmod(c, 2)
            x[i, :, r * h:(r + 1) * h, s * w:(s + 1) * w] += 1.0
        return x, y

    xt, yt = make(n_train)
    xs, ys = make(n_test)
    return DataBundle("quadrants", xt, yt, xs, ys, 4)


class NoTest(DataBundle):
    """A DataBundle whose test split raises when anything reads it."""

    reads: list[str]

    def _split(self, split: str) -> tuple[Any, torch.Tensor]:
        if split == "test":
            raise AssertionError("the test split was read")
        return super()._split(split)

    def __getattribute__(self, name: str) -> Any:
        if name in ("x_test", "y_test"):
            raise AssertionError(f"{name} was read")
        return super().__getattribute__(name)


def no_test(data: DataBundle) -> NoTest:
    return NoTest(data.name, data.x_train, data.y_train, torch.zeros(1), torch.zeros(1),
                  data.num_classes)


class ZeroedExit(nn.Module):
    """The block before the exit sees zeros; the final head reads the input directly: an
    exit here can only guess, the static model is perfect."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-5.0, 0, 0, 0], [5.0, 0, 0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x * 0)
        return self.fc(x) + 0 * h.mean(1, keepdim=True)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)
