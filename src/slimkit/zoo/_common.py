"""What every zoo family shares: the registry, the builder contract, input-shape parsing.

A zoo builder is a plain function ``(input_shape, num_classes, *, kwarg=default) -> nn.Module``.
Registering it through :func:`zoo_model` wraps it so that every builder, whichever family it
comes from, behaves the same way:

* unknown keyword arguments raise :class:`ConfigError` naming the model and its valid kwargs;
* the input shape and class count are checked before anything is built;
* the returned module carries ``slimkit_spec``, a JSON-serializable record of the build
  arguments, so that a checkpoint can hold "architecture + weights" instead of a pickled module.
"""

from __future__ import annotations

import functools
import inspect
import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimkit.core.errors import ConfigError, DataError, did_you_mean
from slimkit.core.registry import Registry

Builder = Callable[..., nn.Module]

ZOO: Registry[Builder] = Registry("zoo model")


def zoo_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder in :data:`ZOO` under ``name``, wrapped with the common checks.

    The builder must take ``(input_shape, num_classes)`` positionally and its options as
    keyword-only parameters with defaults; those parameters are the model's valid kwargs.
    """

    def decorate(fn: Builder) -> Builder:
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

        @functools.wraps(fn)
        def builder(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
            check_kwargs(name, kwargs, defaults)
            shape = normalize_shape(name, input_shape)
            classes = check_num_classes(name, num_classes)
            model = fn(shape, classes, **kwargs)
            model.slimkit_spec = {
                "zoo": name,
                "input_shape": list(shape),
                "num_classes": classes,
                "kwargs": {**defaults, **kwargs},
            }
            return model

        ZOO.register(name, builder)
        return builder

    return decorate


def check_kwargs(model: str, kwargs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Reject kwargs the model does not take, or values that cannot be saved as JSON."""
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        hint = did_you_mean(unknown[0], defaults)
        valid = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(
            f"zoo model '{model}' got unknown kwarg(s) {', '.join(map(repr, unknown))}.{hint} "
            f"Valid kwargs: {valid}."
        )
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"zoo model '{model}': kwarg '{key}' must be a plain JSON value "
                f"(int, float, str, bool, None), got {type(value).__name__}"
            ) from None


def normalize_shape(model: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Turn ``input_shape`` (one sample, no batch dim) into a tuple of positive ints."""
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        raise DataError(
            f"zoo model '{model}': input_shape must be a sequence of ints such as (1, 28, 28), "
            f"got {input_shape!r}"
        ) from None
    if not shape or any(s < 1 for s in shape):
        raise DataError(
            f"zoo model '{model}': input_shape must be non-empty with positive sizes "
            f"(one sample, without the batch dim), got {shape}"
        )
    return shape


def check_num_classes(model: str, num_classes: int) -> int:
    """Return ``num_classes`` as an int, refusing anything below 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"zoo model '{model}': num_classes must be a positive int, got {num_classes!r}"
        )
    return num_classes


def positive_int(model: str, key: str, value: Any) -> int:
    """Validate an integer kwarg that must be at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"zoo model '{model}': kwarg '{key}' must be an int >= 1, got {value!r}")
    return value


def positive_float(model: str, key: str, value: Any) -> float:
    """Validate a float kwarg that must be above 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"zoo model '{model}': kwarg '{key}' must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SpatialInput:
    """An input read as channels plus 1 or 2 spatial dims.

    Attributes:
        channels: input channels (1 for a bare ``(L,)`` signal).
        spatial: ``(H, W)`` for images, ``(L,)`` for signals.
        add_channel: the samples come without a channel dim (``(L,)``) and the model must
            insert one, so that ``[batch, L]`` becomes ``[batch, 1, L]``.
    """

    channels: int
    spatial: tuple[int, ...]
    add_channel: bool

    @property
    def ndim(self) -> int:
        """Number of spatial dims: 2 selects Conv2d/BatchNorm2d, 1 selects Conv1d/BatchNorm1d."""
        return len(self.spatial)


def spatial_input(model: str, shape: tuple[int, ...]) -> SpatialInput:
    """Read ``shape`` as an image ``(C, H, W)``, a signal ``(C, L)``, or a bare signal ``(L,)``.

    Raises:
        DataError: for any other rank, saying which shapes the model takes.
    """
    if len(shape) == 3:
        return SpatialInput(shape[0], shape[1:], add_channel=False)
    if len(shape) == 2:
        return SpatialInput(shape[0], shape[1:], add_channel=False)
    if len(shape) == 1:
        return SpatialInput(1, shape, add_channel=True)
    raise DataError(
        f"zoo model '{model}' takes images (C, H, W), signals (C, L) or bare signals (L,); "
        f"got input_shape {shape}. Reshape the data to one of these layouts."
    )


def input_adapter(inp: SpatialInput) -> nn.Module:
    """The first layer of a conv model: adds the channel dim to bare ``(L,)`` signals."""
    return nn.Unflatten(1, (1, inp.spatial[0])) if inp.add_channel else nn.Identity()


def conv_cls(ndim: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    """Conv1d for signals, Conv2d for images."""
    return nn.Conv2d if ndim == 2 else nn.Conv1d


def batchnorm_cls(ndim: int) -> type[nn.BatchNorm1d] | type[nn.BatchNorm2d]:
    """BatchNorm1d for signals, BatchNorm2d for images."""
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm1d


def global_pool(ndim: int) -> nn.Sequential:
    """Global average pooling followed by flatten: ``[B, C, *spatial] -> [B, C]``."""
    pool = nn.AdaptiveAvgPool2d(1) if ndim == 2 else nn.AdaptiveAvgPool1d(1)
    return nn.Sequential(pool, nn.Flatten(1))
