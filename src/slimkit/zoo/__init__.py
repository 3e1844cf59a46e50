"""Reference architectures: the models compression papers report on, as plain ``nn.Module``s.

Every model takes one tensor ``[batch, *input_shape]`` and returns logits
``[batch, num_classes]``, builds deterministically under ``torch.manual_seed``, and exports with
``torch.export`` and ``torch.onnx.export`` with a dynamic batch dim. Input conventions follow the
built-in datasets: images ``(C, H, W)`` float32, 1-D signals ``(L,)`` float32 (MNIST-1D, read as
one channel), token ids ``(L,)`` int64 (``text_encoder`` with ``input_dtype="int64"``).

========================  ================================================================
name                      architecture
========================  ================================================================
``lenet300``              LeNet-300-100 MLP (Han et al. 2015); any input shape
``lenet5``                Caffe LeNet-5 of Deep Compression; images and 1-D signals
``resnet20``/``resnet56``  CIFAR ResNets, option-A shortcuts (He et al. 2016)
``mobilenetv2``           MobileNetV2, small-input variant (Sandler et al. 2018)
``vit``                   small Vision Transformer (Dosovitskiy et al. 2021); images only
``text_encoder``          small transformer encoder for token ids or float sequences
========================  ================================================================

Each built model carries ``model.slimkit_spec`` (JSON-serializable build arguments);
:func:`build_from_spec` rebuilds the architecture from it, so checkpoints never pickle modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.zoo import lenet, mobilenet, resnet, text, vit  # noqa: F401  (register the models)
from slimkit.zoo._common import ZOO

__all__ = ["ZOO", "build_from_spec", "build_model", "zoo_names"]

_SPEC_KEYS = ("zoo", "input_shape", "num_classes", "kwargs")


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build the zoo model ``name`` for one sample shape and a number of classes.

    Args:
        name: a registered name (see :func:`zoo_names`).
        input_shape: shape of one sample without the batch dim, e.g. ``(1, 28, 28)``.
        num_classes: size of the logits.
        **kwargs: the model's options (``width``, ``width_mult``, ``dim``, ...).

    Returns:
        The model in training mode, with ``slimkit_spec`` set.

    Raises:
        ConfigError: unknown model name (naming the closest one), unknown kwargs (naming the
            valid ones) or invalid kwarg values.
        DataError: an input shape the architecture cannot take, saying which shape it needs.

    Example:
        >>> import torch
        >>> model = build_model("lenet5", (1, 28, 28), 10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return ZOO.get(name)(input_shape, num_classes, **kwargs)


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``slimkit_spec`` (weights are initialized afresh).

    Raises:
        ConfigError: when the spec misses keys or names an unknown model.
    """
    missing = [key for key in _SPEC_KEYS if key not in spec]
    if missing:
        raise ConfigError(
            f"zoo spec is missing key(s) {', '.join(missing)}; a spec needs {', '.join(_SPEC_KEYS)}"
        )
    kwargs = spec["kwargs"]
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"zoo spec 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    return build_model(spec["zoo"], tuple(spec["input_shape"]), spec["num_classes"], **kwargs)


def zoo_names() -> list[str]:
    """Names of all registered zoo models, sorted."""
    return ZOO.names()
