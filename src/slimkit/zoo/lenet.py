"""LeNet-300-100 and LeNet-5: the two MNIST networks of the pruning literature.

Both follow the Caffe definitions used by Han et al., "Learning both Weights and Connections
for Efficient Neural Networks" (NeurIPS 2015) and "Deep Compression" (ICLR 2016), so that
compression ratios reported on them can be compared with the papers' tables:

* LeNet-300-100 on 784 inputs / 10 classes: 266,610 parameters.
* LeNet-5 on (1, 28, 28) / 10 classes: 431,080 parameters.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.zoo._common import SpatialInput, conv_cls, input_adapter, spatial_input, zoo_model

_PADDINGS = ("auto", "valid", "same")


class LeNet300(nn.Module):
    """Fully connected LeNet-300-100: flatten -> 300 -> ReLU -> 100 -> ReLU -> classes.

    Args:
        in_features: number of input values per sample (the product of the input shape).
        num_classes: size of the logits.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


@zoo_model("lenet300")
def lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-300-100 MLP (Han et al. 2015); takes any input shape by flattening it.

    Example:
        >>> model = lenet300((1, 28, 28), 10)
        >>> sum(p.numel() for p in model.parameters())
        266610
    """
    return LeNet300(math.prod(input_shape), num_classes)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 20 5x5 -> maxpool 2 -> conv 50 5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc.

    As in Caffe's ``lenet_train_test.prototxt`` there is no nonlinearity after the convolutions;
    max pooling is the only one before ``fc1``.

    Args:
        inp: the parsed input (channels, spatial size, 1-D or 2-D).
        num_classes: size of the logits.
        pad: convolution padding, 0 (Caffe's "valid") or 2 ("same").
    """

    def __init__(self, inp: SpatialInput, num_classes: int, pad: int) -> None:
        super().__init__()
        conv = conv_cls(inp.ndim)
        pool = nn.MaxPool2d if inp.ndim == 2 else nn.MaxPool1d
        self.adapt = input_adapter(inp)
        self.conv1 = conv(inp.channels, 20, 5, padding=pad)
        self.pool1 = pool(2)
        self.conv2 = conv(20, 50, 5, padding=pad)
        self.pool2 = pool(2)
        self.flatten = nn.Flatten(1)
        out = [_lenet5_out_size(s, pad) for s in inp.spatial]
        self.fc1 = nn.Linear(50 * math.prod(out), 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.conv1(self.adapt(x)))
        x = self.flatten(self.pool2(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x)))


def _lenet5_out_size(size: int, pad: int) -> int:
    """Spatial size after conv5 -> pool2 -> conv5 -> pool2 (floor division, as PyTorch pools)."""
    size = (size + 2 * pad - 4) // 2
    return (size + 2 * pad - 4) // 2


@zoo_model("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int, *, padding: str = "auto") -> nn.Module:
    """Caffe LeNet-5 from Deep Compression (Han et al. 2016), for images or 1-D signals.

    Images ``(C, H, W)`` use Conv2d; signals ``(C, L)`` and bare signals ``(L,)`` (MNIST-1D)
    use Conv1d with the same layer sizes.

    Small inputs: the Caffe network uses unpadded ("valid") 5x5 convolutions, which need every
    spatial size >= 16 (28 -> 24 -> 12 -> 8 -> 4). For smaller inputs such as sklearn's 8x8
    digits, ``padding="auto"`` switches both convolutions to "same" padding (pad 2), so only the
    pools shrink the map (8 -> 4 -> 2) and ``fc1``'s input size is computed from the result.
    Padding keeps the layer widths of the paper, which matters more for comparisons than the
    exact receptive field.

    Args:
        input_shape: one sample's shape: ``(C, H, W)``, ``(C, L)`` or ``(L,)``.
        num_classes: size of the logits.
        padding: ``"auto"`` (valid if every spatial size >= 16, else same), ``"valid"`` or
            ``"same"``.

    Raises:
        ConfigError: for an unknown ``padding``.
        DataError: when the input is too small for the chosen padding (valid needs >= 16,
            same needs >= 4 per spatial dim) or has an unsupported rank.

    Example:
        >>> sum(p.numel() for p in lenet5((1, 28, 28), 10).parameters())
        431080
    """
    if padding not in _PADDINGS:
        raise ConfigError(
            f"zoo model 'lenet5': kwarg 'padding' must be one of {', '.join(_PADDINGS)}, "
            f"got {padding!r}"
        )
    inp = spatial_input("lenet5", input_shape)
    smallest = min(inp.spatial)
    if padding == "auto":
        padding = "valid" if smallest >= 16 else "same"
    pad, need = (0, 16) if padding == "valid" else (2, 4)
    if smallest < need:
        raise DataError(
            f"zoo model 'lenet5' with {padding} padding needs every spatial size >= {need}, "
            f"got input_shape {input_shape}. Use larger inputs"
            + (" or padding='same' (needs >= 4)." if padding == "valid" else ".")
        )
    return LeNet5(inp, num_classes, pad)
