"""Inputs and outputs as users' models take and give them: a tensor, a tuple or a dict.

A batch of *inputs* is a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a dict
of named tensors (``model(**x)``, as Hugging Face models take ``input_ids`` and
``attention_mask``); every tensor has the batch as its first axis. *Outputs* may be a tensor, a
tuple, a dict or a Hugging Face ``ModelOutput``, nested; :func:`flatten` names every output
tensor (``output``, ``output_1``, ``logits``, ``past_key_values.0.1``) and :func:`select` picks
the one that is judged (by default the first, as ``outputs[0]`` is in Hugging Face).

Everything below ``io/`` calls models through :func:`call` and reads outputs through
:func:`select` / :func:`flatten`, so that no layer assumes "one tensor in, one tensor out".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from slimkit.core.errors import DataError, ModelError

Inputs = torch.Tensor | tuple | dict

#: The judged output's name while a stage or a measurement runs on a model (``None``: the first).
_JUDGED: ContextVar[str | None] = ContextVar("slimkit_judged_output", default=None)


@contextlib.contextmanager
def judging(output: str | None) -> Iterator[None]:
    """Within the block, :func:`select` without a key picks ``output`` (a model's judged
    output, ``SlimModel.output``), so that techniques working on bare modules judge the
    output the user named."""
    token = _JUDGED.set(output)
    try:
        yield
    finally:
        _JUDGED.reset(token)


def _unwrap(inputs: Any) -> Any:
    """A one-item tuple holding a dict or tuple batch is that batch: code written for one
    tensor passes ``(x,)``, and stays right when ``x`` is a dict of named inputs."""
    while isinstance(inputs, list | tuple) and len(inputs) == 1 \
            and isinstance(inputs[0], Mapping | list | tuple):
        inputs = inputs[0]
    return inputs


def call(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, a tuple or a dict batch."""
    inputs = _unwrap(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def leaves(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of a batch (or of nested batches), in order."""
    inputs = _unwrap(inputs)
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    if not isinstance(inputs, list | tuple):
        return []
    return [t for item in inputs for t in leaves(item)]


def names(inputs: Inputs) -> list[str]:
    """One name per input tensor: the dict's keys, else ``input`` / ``input_1``, ..."""
    inputs = _unwrap(inputs)
    if isinstance(inputs, Mapping):
        return [k for k, t in inputs.items() if isinstance(t, torch.Tensor)]
    n = len(leaves(inputs))
    return ["input"] + [f"input_{i}" for i in range(1, n)]


def tmap(fn: Callable[[torch.Tensor], Any], inputs: Inputs) -> Inputs:
    """Apply ``fn`` to every tensor of a batch, keeping its structure (non-tensors kept)."""
    inputs = _unwrap(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in inputs)
    return fn(inputs)


def size(inputs: Inputs) -> int:
    """The batch size (first axis, which every tensor of the batch shares).

    Raises:
        DataError: tensors with different first axes, or no tensor at all.
    """
    sizes = {len(t) if t.dim() else 0 for t in leaves(inputs)}
    if len(sizes) != 1:
        raise DataError(f"a batch's tensors must share their first (batch) axis, got sizes "
                        f"{sorted(sizes) or 'none (no tensor)'}")
    return sizes.pop()


def take(inputs: Inputs, index: Any) -> Inputs:
    """Rows ``index`` (a slice, an int tensor, a list) of every tensor in the batch."""
    return tmap(lambda t: t[index], inputs)


def to(inputs: Inputs, device: torch.device | str) -> Inputs:
    return tmap(lambda t: t.to(device), inputs)


def cat(batches: Sequence[Inputs]) -> Inputs:
    """Concatenate batches of one structure along the batch axis."""
    batches = [_unwrap(b) for b in batches]
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    if isinstance(first, list | tuple):
        return tuple(torch.cat([b[i] for b in batches]) for i in range(len(first)))
    return torch.cat(list(batches))


def structure(inputs: Inputs) -> tuple:
    """What a batch looks like apart from its size: names, per-sample shapes, dtypes."""
    return tuple((n, tuple(t.shape[1:]), t.dtype) for n, t in zip(names(inputs), leaves(inputs),
                                                                    strict=True))


def flatten(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every output tensor by name, in order (``None`` entries, as HF's ``loss``, skipped).

    A tensor is ``output``; a tuple's items are ``output``, ``output_1``, ...; a dict's or a
    ``ModelOutput``'s are their keys; nested containers join names with dots.
    """
    if isinstance(out, torch.Tensor):
        return {prefix or "output": out}
    items: Iterable[tuple[str, Any]]
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput (an OrderedDict)
        items = ((str(k), v) for k, v in out.items())
    elif isinstance(out, list | tuple):
        items = ((str(i) if prefix else ("output" if i == 0 else f"output_{i}"), v)
                 for i, v in enumerate(out))
    elif out is None:
        return {}
    else:
        raise ModelError(f"a model output of type {type(out).__name__} is neither a tensor, a "
                         "tuple, a dict nor a ModelOutput")
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def select(out: Any, key: str | None = None) -> torch.Tensor:
    """The judged output: ``key`` by its :func:`flatten` name, else the one named by
    :func:`judging`, else the first output tensor.

    Raises:
        ModelError: ``key`` names no output (the names it has are listed).
    """
    key = key if key is not None else _JUDGED.get()
    if isinstance(out, torch.Tensor) and key in (None, "output"):
        return out
    flat = flatten(out)
    if not flat:
        raise ModelError("the model returned no tensor")
    if key is None:
        return next(iter(flat.values()))
    if key not in flat:
        raise ModelError(f"the model has no output '{key}'; its outputs are "
                         f"{', '.join(flat)} (set output: to one of them)")
    return flat[key]

