"""Physically slice a model by a structured-pruning plan (new, smaller nn.Parameters; no masks).

A plan's ``slices`` say, per parameter/buffer name, which indices to keep along which dims;
``heads`` give the new head count of attention modules, ``head_dims`` their new head size, and
``scale`` factors for query projections whose attention derives the softmax scale from the
head size (so that the pruned model keeps the original ``1/sqrt(head_dim)``). Applying them
needs no graph, so the same plan rebuilds the pruned architecture on a freshly built model
(artifact loading).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.registry import Registry
from slimkit.graph.attention import (
    HEAD_ATTRS,
    HEAD_SIZE_ATTRS,
    SCALE_ATTRS,
    WIDTH_ATTRS,
    head_width,
    scale_follows_head_size,
)
from slimkit.graph.layers import is_hf_conv1d

#: ``fn(module, old_shapes)`` refreshing a module's size attributes after its tensors shrank.
ATTR_UPDATERS: Registry[Callable[[nn.Module, dict[str, tuple[int, ...]]], None]] = \
    Registry("module size updater")


@ATTR_UPDATERS.register("conv")
def _conv(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    w = m.weight
    if m.transposed:  # weight [C_in, C_out / groups, k...]; grouped ones are never sliced
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        return
    if "weight" in old and m.groups > 1:
        cout_g = old["weight"][0] // m.groups
        m.groups = w.shape[0] // cout_g
    m.out_channels = w.shape[0]
    m.in_channels = w.shape[1] * m.groups


@ATTR_UPDATERS.register("linear")
def _linear(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.out_features, m.in_features = m.weight.shape


@ATTR_UPDATERS.register("hf_conv1d")
def _hf_conv1d(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    # weight [in, out]; its forward shapes the output with nf
    m.nx, m.nf = (int(s) for s in m.weight.shape)


@ATTR_UPDATERS.register("batchnorm")
def _bn(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    m.num_features = ref.shape[0]


@ATTR_UPDATERS.register("layernorm")
def _ln(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@ATTR_UPDATERS.register("groupnorm")
def _gn(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    per = old["weight"][0] // m.num_groups if "weight" in old else 1
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per


@ATTR_UPDATERS.register("embedding")
def _emb(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _updater_for(m: nn.Module) -> str | None:
    kinds = ((nn.modules.conv._ConvNd, "conv"), (nn.Linear, "linear"),
             (nn.modules.batchnorm._NormBase, "batchnorm"), (nn.LayerNorm, "layernorm"),
             (nn.GroupNorm, "groupnorm"), (nn.Embedding, "embedding"))
    for cls, name in kinds:
        if isinstance(m, cls):
            return name
    return "hf_conv1d" if is_hf_conv1d(m) else None


def apply_slices(model: nn.Module, slices: dict[str, dict[str, list[int]]],
                 heads: dict[str, int] | None = None, head_dims: dict[str, int] | None = None,
                 scale: dict[str, float] | None = None) -> nn.Module:
    """Replace every planned tensor by its kept slice, in place; update size attributes.

    Args:
        model: the module to shrink (callers pass a copy).
        slices: ``{"layer.weight": {"0": [kept indices], "1": [...]}}``.
        heads: ``{"attention module": new head count}``.
        head_dims: ``{"attention module": new head size}``.
        scale: ``{"tensor": factor}``: the kept slice is multiplied by it.

    Returns:
        ``model``, with smaller parameters and buffers.

    Raises:
        ConfigError: a slice names a tensor the model does not have (a plan for another model).
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    modules = dict(model.named_modules(remove_duplicate=False))
    replaced: dict[int, torch.Tensor] = {}
    old_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, dims in slices.items():
        if name not in tensors:
            raise ConfigError(f"structured-prune plan names tensor '{name}' that the model does "
                              "not have; was the plan made for another model?")
        t = tensors[name]
        new = t.detach()
        for d, keep in dims.items():
            new = new.index_select(int(d), torch.as_tensor(keep, dtype=torch.long,
                                                           device=new.device))
        if name in (scale or {}):
            new = new * scale[name]
        if isinstance(t, nn.Parameter):
            replaced[id(t)] = nn.Parameter(new.clone(), requires_grad=t.requires_grad)
        else:
            replaced[id(t)] = new.clone()
    for mod_name, m in model.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):  # every owner: tied tensors stay tied, and
            for k, v in store.items():  # each owner's sizes follow (a tied embedding's too)
                if v is not None and id(v) in replaced:
                    old_shapes.setdefault(mod_name, {})[k] = tuple(v.shape)
                    store[k] = replaced[id(v)]
    for mod_name, old in old_shapes.items():
        kind = _updater_for(modules[mod_name])
        if kind is not None:
            ATTR_UPDATERS.get(kind)(modules[mod_name], old)
    for mod_name, count in (heads or {}).items():
        set_heads(modules[_module(modules, mod_name)], count)
    for mod_name, size in (head_dims or {}).items():
        set_head_dim(modules[_module(modules, mod_name)], size)
    return model


def _module(modules: dict[str, nn.Module], name: str) -> str:
    if name not in modules:
        raise ConfigError(f"structured-prune plan names attention module '{name}' that the "
                          "model does not have; was the plan made for another model?")
    return name


def set_heads(module: nn.Module, count: int) -> None:
    """Set every head-count attribute of an attention module (and the widths derived from it)."""
    width = head_width(module)
    for attr in HEAD_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, count)
    _sync_widths(module, width)


def set_head_dim(module: nn.Module, size: int) -> None:
    """Set the head-size attributes of an attention module (and its widths, ``all_head_size``).

    A ``scaling`` that follows the head size becomes ``size ** -0.5``, as a module built for
    that size computes it; the plan's query scale factor keeps the product equal to the
    original ``q . k / sqrt(original head size)``. Any other scale is left alone.
    """
    old = next((getattr(module, a) for a in HEAD_SIZE_ATTRS
                if isinstance(getattr(module, a, None), int)), None)
    width = head_width(module)
    if old is not None and scale_follows_head_size(module, old):
        for attr in SCALE_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, size ** -0.5)
    for attr in HEAD_SIZE_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, size)
    _sync_widths(module, width)


def _sync_widths(module: nn.Module, old: int | None) -> None:
    """Width attributes (``all_head_size``, GPT-2's ``split_size``) that were head count x
    head size before the change are that product again."""
    new = head_width(module)
    if old is None or new is None:
        return
    for attr in WIDTH_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == old:
            setattr(module, attr, new)
