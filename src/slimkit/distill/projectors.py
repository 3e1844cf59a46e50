"""Learned adapters between student and teacher features, and self-distillation exit heads.

Feature layouts. A 4-D feature is read as ``[B, C, H, W]`` and a 2-D one as ``[B, C]``. A 3-D
feature is ambiguous: ``[B, C, L]`` from a Conv1d net ("channels_first") or ``[B, T, D]``
tokens from a transformer ("channels_last"). With ``layout="auto"``, :func:`resolve_layout`
decides by module type: walking ``model.named_modules()`` (registration order) up to the end of
the tapped layer's subtree, the last Conv/BatchNorm/pooling layer votes channels_first and the
last Linear/LayerNorm/Embedding/attention layer votes channels_last; the last vote wins (with no
vote, channels_last). Module types, not shapes, decide because a single tensor's shape cannot
tell ``[B, C, L]`` from ``[B, T, D]``; the config's ``layout`` overrides the guess.

Projectors (FitNets' regressors) map the student's channels to the teacher's: a 1x1 Conv1d/
Conv2d for channels-first features, a Linear on the last dim for channels-last features and for
2-D ones, nothing when the widths already match. They output channels-first tensors resized
(adaptive average pooling) to the teacher's spatial size, so every feature loss compares two
tensors of one canonical layout.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from slimkit.core.errors import ModelError

__all__ = ["ExitHead", "Projector", "channel_map", "feature_channels", "pool_features",
           "resolve_layout", "to_channels_first"]

Resolved = Literal["channels_first", "channels_last"]

_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
                   nn.InstanceNorm1d, nn.InstanceNorm2d, nn.MaxPool1d, nn.MaxPool2d,
                   nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.MultiheadAttention)


def _infer_layout(model: nn.Module, name: str) -> Resolved:
    vote: Resolved = "channels_last"
    inside = False
    for n, module in model.named_modules():
        in_subtree = not name or n == name or n.startswith(name + ".")
        if inside and not in_subtree:
            break  # past the end of the tapped layer's subtree
        inside = inside or in_subtree
        if isinstance(module, _CHANNELS_FIRST):
            vote = "channels_first"
        elif isinstance(module, _CHANNELS_LAST):
            vote = "channels_last"
    return vote


def resolve_layout(model: nn.Module, name: str, ndim: int, layout: str) -> Resolved:
    """The layout of the ``ndim``-D output of layer ``name`` (see the module docstring).

    Args:
        model: the model holding the layer.
        name: the layer's name in ``model.named_modules()``.
        ndim: rank of its output (only 3-D outputs are guessed; 4-D and up are channels first).
        layout: "auto", "channels_first" or "channels_last" (the latter two are returned as is).
    """
    if layout != "auto":
        return layout  # type: ignore[return-value]
    if ndim != 3:
        return "channels_first"
    return _infer_layout(model, name)


def to_channels_first(x: Tensor, layout: str) -> Tensor:
    """Move a channels-last feature's last dim to dim 1 (2-D and channels-first pass through)."""
    return x.movedim(-1, 1) if layout == "channels_last" and x.dim() > 2 else x


def feature_channels(shape: tuple[int, ...], layout: str) -> int:
    """Number of channels of a feature of ``shape`` in ``layout``."""
    return shape[-1] if layout == "channels_last" or len(shape) == 2 else shape[1]


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if len(shape) == 2:
        return ()
    return tuple(shape[1:-1]) if layout == "channels_last" else tuple(shape[2:])


def channel_map(c_in: int, c_out: int, ndim: int, layout: str, what: str) -> nn.Module:
    """A learned map from ``c_in`` to ``c_out`` channels; ``nn.Identity`` when they are equal.

    Linear for 2-D and channels-last features (acting on the last dim), 1x1 Conv1d/Conv2d/Conv3d
    for channels-first ``[B, C, *spatial]`` features.

    Raises:
        ModelError: for a channels-first feature of a rank no 1x1 conv handles (names ``what``).
    """
    if c_in == c_out:
        return nn.Identity()
    if ndim == 2 or layout == "channels_last":
        return nn.Linear(c_in, c_out)
    convs = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
    if ndim not in convs:
        raise ModelError(f"{what}: cannot project a {ndim}-D channels-first feature "
                         f"({c_in} -> {c_out} channels); tap a 2-D to 5-D layer")
    return convs[ndim](c_in, c_out, kernel_size=1)


class Projector(nn.Module):
    """Student feature -> the teacher's canonical (channels-first) shape.

    ``channel_map`` (Identity, Linear or 1x1 conv) in the student's own layout, then a move to
    channels first, then adaptive average pooling to the teacher's spatial size when it differs.
    Without a width or size difference it has no parameters and only changes the layout.

    Args:
        student_shape: shape of the student feature (native layout).
        teacher_shape: shape of the teacher feature (native layout).
        student_layout: resolved layout of the student feature.
        teacher_layout: resolved layout of the teacher feature.
        what: a label for error messages (the layer pair).

    Raises:
        ModelError: for features of different ranks.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                 student_layout: str, teacher_layout: str, what: str) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape) or len(student_shape) < 2:
            raise ModelError(f"{what}: student feature {student_shape} and teacher feature "
                             f"{teacher_shape} cannot be matched; pick layers whose outputs "
                             "have the same number of dims, at least [B, C]")
        self.layout = student_layout
        c_s, c_t = feature_channels(student_shape, student_layout), feature_channels(
            teacher_shape, teacher_layout)
        self.channel_map = channel_map(c_s, c_t, len(student_shape), student_layout, what)
        size_s = _spatial(student_shape, student_layout)
        size_t = _spatial(teacher_shape, teacher_layout)
        pools = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
        self.resize = pools[len(size_t)](size_t) if size_s != size_t else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.resize(to_channels_first(self.channel_map(x), self.layout))


def pool_features(x: Tensor, layout: str) -> Tensor:
    """Global average pooling to ``[B, C]``: over spatial dims, or over tokens if channels last."""
    if x.dim() == 2:
        return x
    if layout == "channels_last":
        return x.flatten(1, -2).mean(dim=1)
    return x.flatten(2).mean(dim=2)


class ExitHead(nn.Module):
    """A self-distillation exit: global average pool, then Linear to the classes.

    Args:
        channels: channels of the tapped feature.
        num_classes: width of the model's logits.
        layout: resolved layout of the tapped feature (decides the pooled dims).
    """

    def __init__(self, channels: int, num_classes: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(pool_features(x, self.layout))

