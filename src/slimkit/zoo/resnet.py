"""CIFAR-style ResNets (ResNet-20 and ResNet-56) with option-A shortcuts.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3 stem
with ``width`` filters, then three stages of ``n`` basic blocks with ``width``, ``2*width`` and
``4*width`` filters (the last two start with stride 2), global average pooling and one linear
layer; depth = 6n + 2. Where a block changes shape, the shortcut is by default the paper's
option A: the identity, subsampled by stride and zero-padded with extra channels, so it has no
parameters. ResNet-20 on (3, 32, 32) / 10 classes then has 269,722 parameters and 40.55M MACs
(the "0.27M" of the paper's Table 6). ``shortcut="B"`` uses 1x1 conv + BN projections instead,
which adds 2,752 parameters (272,474 in all) and is the variant some pruning codebases use.

The same networks take 1-D signals (Conv1d/BatchNorm1d) and any spatial size, since each
stride-2 stage maps a size ``s`` to ``ceil(s / 2)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.errors import ConfigError
from slimkit.zoo._common import (
    SpatialInput,
    batchnorm_cls,
    conv_cls,
    global_pool,
    input_adapter,
    positive_int,
    spatial_input,
    zoo_model,
)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample the identity by ``stride`` and zero-pad new channels.

    Slicing with a step and a constant pad export to ONNX ``Slice`` and ``Pad``. The extra
    channels are split evenly before and after the existing ones, as in the reference
    implementations of the paper.
    """

    def __init__(self, stride: int, in_channels: int, out_channels: int, ndim: int) -> None:
        super().__init__()
        self.stride = stride
        self.ndim = ndim
        extra = out_channels - in_channels
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s] if self.ndim == 2 else x[:, :, ::s]
        return F.pad(x, (0, 0) * self.ndim + (self.pad_before, self.pad_after))


def projection(in_channels: int, out_channels: int, stride: int, ndim: int) -> nn.Sequential:
    """Option-B shortcut: a strided 1x1 convolution followed by batch norm."""
    conv, bn = conv_cls(ndim), batchnorm_cls(ndim)
    return nn.Sequential(
        conv(in_channels, out_channels, 1, stride=stride, bias=False), bn(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + x)``."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, ndim: int, shortcut: str = "A"
    ) -> None:
        super().__init__()
        conv, bn = conv_cls(ndim), batchnorm_cls(ndim)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, in_channels, out_channels, ndim)
        else:
            self.shortcut = projection(in_channels, out_channels, stride, ndim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small inputs: stem, three stages of ``n`` blocks, pool, linear.

    Args:
        inp: the parsed input (channels, spatial size, 1-D or 2-D).
        num_classes: size of the logits.
        blocks_per_stage: ``n`` (3 for ResNet-20, 9 for ResNet-56).
        width: filters of the first stage; the others use 2x and 4x.
        shortcut: ``"A"`` (zero-padded identity) or ``"B"`` (1x1 conv + BN projection).
    """

    def __init__(
        self,
        inp: SpatialInput,
        num_classes: int,
        blocks_per_stage: int,
        width: int,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        conv, bn = conv_cls(inp.ndim), batchnorm_cls(inp.ndim)
        self.adapt = input_adapter(inp)
        self.conv1 = conv(inp.channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = bn(width)
        self.relu = nn.ReLU()
        channels = width
        stages = []
        for stage, s in enumerate((1, 2, 2)):
            out_channels = width * 2**stage
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(
                    BasicBlock(channels, out_channels, s if i == 0 else 1, inp.ndim, shortcut)
                )
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = global_pool(inp.ndim)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for convs as in the paper; PyTorch defaults for BN (1, 0) and the classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.adapt(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


def _build(
    name: str, input_shape: tuple[int, ...], num_classes: int, n: int, width: int, shortcut: str
) -> CifarResNet:
    if shortcut not in ("A", "B"):
        raise ConfigError(
            f"zoo model '{name}': kwarg 'shortcut' must be 'A' (zero-padded identity) or "
            f"'B' (1x1 conv projection), got {shortcut!r}"
        )
    inp = spatial_input(name, input_shape)
    return CifarResNet(inp, num_classes, n, positive_int(name, "width", width), shortcut)


@zoo_model("resnet20")
def resnet20(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 16, shortcut: str = "A"
) -> nn.Module:
    """ResNet-20 (He et al. 2016, CIFAR variant); 0.27M parameters, 40.55M MACs at 32x32.

    Args:
        input_shape: ``(C, H, W)``, ``(C, L)`` or ``(L,)``; any spatial size.
        num_classes: size of the logits.
        width: filters of the first stage (16 in the paper).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (projection).

    Example:
        >>> sum(p.numel() for p in resnet20((3, 32, 32), 10).parameters())
        269722
    """
    return _build("resnet20", input_shape, num_classes, 3, width, shortcut)


@zoo_model("resnet56")
def resnet56(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 16, shortcut: str = "A"
) -> nn.Module:
    """ResNet-56 (He et al. 2016, CIFAR variant); 0.85M parameters, 125.5M MACs at 32x32.

    Args:
        input_shape: ``(C, H, W)``, ``(C, L)`` or ``(L,)``; any spatial size.
        num_classes: size of the logits.
        width: filters of the first stage (16 in the paper).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (projection).
    """
    return _build("resnet56", input_shape, num_classes, 9, width, shortcut)
