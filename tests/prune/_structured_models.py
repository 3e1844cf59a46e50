"""Small models with the structures structured pruning must handle (shared by its tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.io import batch as B


class ConvNet(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> relu -> pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated on channels, then a residual add and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 10, 1)
        self.mix = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(s)), torch.relu(self.b(s))], dim=1)
        y = self.mix(y) + s
        return self.head(y.mean((2, 3)))


class SplitNet(nn.Module):
    """chunk into two halves, a conv on each, added back (GLU-like gating on split)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.gate = nn.Linear(24, 12)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.relu(self.left(a)) + torch.sigmoid(self.right(b))
        z = self.gate(torch.cat([y, a, b], 1).mean((2, 3)))
        u, v = z.chunk(2, dim=1)
        return self.head(u * torch.sigmoid(v))


class GroupedNet(nn.Module):
    """Grouped conv (4 groups), depthwise conv with multiplier 2, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.gn(self.grouped(x)))
        x = torch.relu(self.bn(self.dw(x)))
        return self.head(self.pw(x).mean((2, 3)))


class MHANet(nn.Module):
    """Token features -> nn.MultiheadAttention block with residual and LayerNorm -> MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


class SEDecoderNet(nn.Module):
    """Squeeze-and-excitation (a (B, C, 1, 1) gate times the features), then a transposed conv
    decoder whose output is pooled to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        gate = x.mean((2, 3), keepdim=True)
        x = x * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(gate))))
        x = torch.relu(self.bn(self.up(x)))
        return self.head(x.amax((2, 3)))


class DenseNet(nn.Module):
    """DenseNet-style growth: each layer's output is concatenated to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.l1 = nn.Conv2d(8, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.l2 = nn.Conv2d(12, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.l1(torch.relu(self.bn(x)))], 1)
        x = torch.cat([x, self.l2(torch.relu(self.b1(x)))], 1)
        return self.head(torch.relu(self.b2(x)).mean((2, 3)))


class Rolled(nn.Module):
    """A channel roll: an op without a channel rule between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.roll(self.conv(x), 1, dims=1)).mean((2, 3))


class SideNet(nn.Module):
    """Two inputs (an image and side features, positional or by name), two outputs: the
    logits and the features they come from (so conv2's channels reach an output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.side = nn.Linear(5, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.bn1(self.conv1(image)))
        feats = torch.relu(self.conv2(h)).mean((2, 3)) + self.side(side)
        return {"logits": self.head(feats), "features": feats}


def init_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that BN slicing errors show."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def eval_out(model: nn.Module, x: tuple | dict) -> Any:
    """``model(*x)`` (``model(**x)`` for a dict) in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return B.call(model, x)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
