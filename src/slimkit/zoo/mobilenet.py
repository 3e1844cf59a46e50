"""MobileNetV2 for small inputs (CIFAR, MNIST, 8x8 digits, 1-D signals).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018). Each block
expands with a 1x1 conv, filters with a 3x3 depthwise conv, projects back with a linear 1x1 conv,
and adds the input when the shapes match. Channel counts are ``width_mult`` times the paper's and
rounded to a multiple of 8 (``make_divisible``, as in the reference implementation).

Small-input variant (as used for CIFAR-10, e.g. in kuangliu/pytorch-cifar): the stem conv has
stride 1 and the 24-channel stage does not downsample, so the network halves the resolution
three times instead of five (32 -> 4, 28 -> 4, 8 -> 1). The ImageNet schedule would shrink an
8x8 input to a single pixel before half of the network has run.
"""

from __future__ import annotations

from torch import Tensor, nn

from slimkit.core.errors import ConfigError
from slimkit.zoo._common import (
    SpatialInput,
    batchnorm_cls,
    conv_cls,
    global_pool,
    input_adapter,
    positive_float,
    spatial_input,
    zoo_model,
)

# (expansion t, output channels c, repeats n, stride of the first block s): the paper's Table 2,
# with the 24-channel stage's stride set to 1 for small inputs.
_SMALL_INPUT_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping more than 10%.

    Same rule as the reference MobileNet code, so width-scaled models match published sizes.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int, stride: int, groups: int, ndim: int
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU6, with "same" padding."""
    conv = conv_cls(ndim)(
        in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
    )
    return nn.Sequential(conv, batchnorm_cls(ndim)(out_channels), nn.ReLU6())


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, plus the input when shapes match.

    Args:
        in_channels, out_channels: block input and output channels.
        stride: stride of the depthwise conv.
        expand_ratio: hidden channels = ``round(in_channels * expand_ratio)``.
        ndim: 2 for images, 1 for signals.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, ndim: int
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1, 1, 1, ndim))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, hidden, ndim),
            conv_cls(ndim)(hidden, out_channels, 1, bias=False),
            batchnorm_cls(ndim)(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2, small-input variant: features -> global pool -> dropout -> linear.

    Args:
        inp: the parsed input (channels, spatial size, 1-D or 2-D).
        num_classes: size of the logits.
        width_mult: multiplier on every channel count (then rounded to a multiple of 8).
        dropout: dropout probability before the classifier (0.2 in the paper's code).
    """

    def __init__(
        self, inp: SpatialInput, num_classes: int, width_mult: float, dropout: float
    ) -> None:
        super().__init__()
        ndim = inp.ndim
        channels = make_divisible(32 * width_mult)
        # The paper never narrows the last conv below 1280: it carries the classifier's features.
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_relu6(inp.channels, channels, 3, 1, 1, ndim)]
        for t, c, n, s in _SMALL_INPUT_SETTINGS:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t, ndim))
                channels = out_channels
        layers.append(conv_bn_relu6(channels, last_channels, 1, 1, 1, ndim))
        self.adapt = input_adapter(inp)
        self.features = nn.Sequential(*layers)
        self.pool = global_pool(ndim)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference initialization: He (fan_out) convs, N(0, 0.01) classifier, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.adapt(x))
        return self.classifier(self.pool(x))


@zoo_model("mobilenetv2")
def mobilenetv2(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018), small-input variant; 2.24M params at width 1, 10 classes.

    Args:
        input_shape: ``(C, H, W)``, ``(C, L)`` or ``(L,)``; any spatial size (each of the three
            stride-2 stages maps ``s`` to ``ceil(s / 2)``).
        num_classes: size of the logits.
        width_mult: channel multiplier (1.0 in the paper; 0.35-1.4 are common).
        dropout: dropout before the classifier, in ``[0, 1)``.

    Raises:
        ConfigError: for a non-positive ``width_mult`` or a ``dropout`` outside ``[0, 1)``.

    Example:
        >>> model = mobilenetv2((1, 28, 28), 10, width_mult=0.5)
    """
    width_mult = positive_float("mobilenetv2", "width_mult", width_mult)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(
            f"zoo model 'mobilenetv2': kwarg 'dropout' must be in [0, 1), got {dropout!r}"
        )
    inp = spatial_input("mobilenetv2", input_shape)
    return MobileNetV2(inp, num_classes, width_mult, float(dropout))
