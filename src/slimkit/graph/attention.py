"""The attribute names attention modules keep their shape in (head count, head size, scale).

Attention written by users, PyTorch, Hugging Face or timm reshapes q/k/v with sizes it reads
from its own attributes, under several spellings. The dependency analysis reads them to know
which modules hold a group's head count or head size (and the width a fused q/k/v projection
is split by); the slicer and the Hugging Face config sync set them after pruning. This is their
one home.
"""

from __future__ import annotations

import math

from torch import nn

#: Int attributes holding an attention module's head count.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
#: Int attributes holding an attention module's head size (what its reshapes read).
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size", "dim_head", "d_head")
#: Float attributes holding an attention module's softmax scale.
SCALE_ATTRS = ("scaling", "scale")
#: Int attributes holding head count x head size, the width of each of q, k and v: Hugging
#: Face's ``all_head_size``, and GPT-2's ``split_size`` (what its fused q/k/v projection
#: ``c_attn`` is split by). The slicer keeps them equal to the product.
WIDTH_ATTRS = ("all_head_size", "split_size")


def first_attr(module: nn.Module | None, attrs: tuple[str, ...], kind: type) -> str | None:
    """The first of ``attrs`` that ``module`` holds with exactly the type ``kind``, or None."""
    return next((a for a in attrs if type(getattr(module, a, None)) is kind), None)


def head_width(module: nn.Module | None) -> int | None:
    """Head count x head size of an attention module, when it holds both as ints."""
    count = first_attr(module, HEAD_ATTRS, int)
    size = first_attr(module, HEAD_SIZE_ATTRS, int)
    if count is None or size is None:
        return None
    return getattr(module, count) * getattr(module, size)


def split_follows_heads(module: nn.Module | None, piece: int) -> bool:
    """Whether ``module`` splits a fused projection into pieces of ``piece`` channels by a size
    that follows its heads: a :data:`WIDTH_ATTRS` attribute holding ``piece``, equal to head
    count x head size (GPT-2: ``c_attn(x).split(self.split_size, dim=2)``). The slicer then
    sets that size with the heads, so q, k and v keep their heads (or head sizes) alike."""
    return head_width(module) == piece and any(
        type(getattr(module, a, None)) is int and getattr(module, a) == piece
        for a in WIDTH_ATTRS)


def scale_follows_head_size(module: nn.Module | None, head_size: int) -> bool:
    """Whether ``module``'s softmax scale is ``1/sqrt(head size)`` and follows that size.

    True when it has no float scale attribute (the scale is then taken from the run-time
    head size, ``q.shape[-1] ** -0.5`` as the SDPA default), or when its ``scaling`` equals
    ``head_size ** -0.5`` and a head-size attribute holds ``head_size`` (Hugging Face: both
    come from the config, so a model rebuilt from the pruned config computes the new size's
    scale). A scale of any other value is a constant of the module and stays as it is.
    """
    scale = first_attr(module, SCALE_ATTRS, float)
    if scale is None:
        return True
    size = first_attr(module, HEAD_SIZE_ATTRS, int)
    return size is not None and getattr(module, size) == head_size and \
        math.isclose(getattr(module, scale), head_size ** -0.5, rel_tol=1e-9)


__all__ = ["HEAD_ATTRS", "HEAD_SIZE_ATTRS", "SCALE_ATTRS", "WIDTH_ATTRS", "first_attr",
           "head_width", "scale_follows_head_size", "split_follows_heads"]
