"""``nn.MultiheadAttention`` rewritten with four ``nn.Linear``, so that its heads can be pruned.

``nn.MultiheadAttention`` packs q/k/v into one ``in_proj_weight`` and checks ``embed_dim`` and
``num_heads`` against its tensors, so structured pruning has to keep its sizes.
:class:`UnfusedMultiheadAttention` computes the same thing (same call, same outputs and
attention weights) with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` ``nn.Linear`` layers and
explicit matmuls, reading the head size from the tensors at run time and taking the softmax
scale from it (``q.shape[-1] ** -0.5``): the dependency analysis then sees it like any
q/k/v/out attention, and removing heads or head dims only slices the four linears and updates
``num_heads``/``head_dim``.

Example:
    >>> layer = nn.TransformerEncoderLayer(32, 4, batch_first=True)
    >>> swapped, skipped = unfuse_mha(layer)
    >>> swapped, type(layer.self_attn).__name__
    (['self_attn'], 'UnfusedMultiheadAttention')
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.io.model import replace_module


def unfusable_reason(mha: nn.Module) -> str | None:
    """Why ``mha`` cannot be rewritten as :class:`UnfusedMultiheadAttention` (None: it can)."""
    if type(mha) is not nn.MultiheadAttention:
        return (f"{type(mha).__name__} subclasses nn.MultiheadAttention and may change its "
                "forward; it keeps its sizes")
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True (learned key/value biases appended to the sequence) is not " \
               "supported; it keeps its sizes"
    if mha.add_zero_attn:
        return "add_zero_attn=True (a zero key/value appended to the sequence) is not " \
               "supported; it keeps its sizes"
    return None


class UnfusedMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` made of q/k/v/out ``nn.Linear`` and explicit matmuls.

    Same constructor arguments (without ``add_bias_kv``/``add_zero_attn``), same forward
    signature and results; ``q``/``k``/``v`` project to ``num_heads * head_dim`` features.

    Args:
        embed_dim: query and output width.
        num_heads: number of heads; ``embed_dim`` must be divisible by it.
        dropout: dropout on the attention weights (training only).
        bias: biases on the four projections.
        kdim: key width (default ``embed_dim``).
        vdim: value width (default ``embed_dim``).
        batch_first: inputs are ``[batch, seq, feature]`` (else ``[seq, batch, feature]``).
    """

    # nn.TransformerEncoder(Layer) read these before taking their fused fast path (which would
    # use ``in_proj_weight``); these values send them to the ordinary path, i.e. to forward().
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    @property
    def embed_dim(self) -> int:
        return self.out_proj.out_features

    @property
    def kdim(self) -> int:
        return self.k_proj.in_features

    @property
    def vdim(self) -> int:
        return self.v_proj.in_features

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> UnfusedMultiheadAttention:
        """The equivalent module, with ``mha``'s weights copied (``mha`` is not modified).

        Raises:
            ModelError: ``mha`` uses a feature this module cannot represent
                (:func:`unfusable_reason`).
        """
        why = unfusable_reason(mha)
        if why is not None:
            raise ModelError(f"cannot unfuse this nn.MultiheadAttention: {why}")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                  mha.kdim, mha.vdim, mha.batch_first, w.device, w.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        pairs = [(new.q_proj, weights[0], biases[0]), (new.k_proj, weights[1], biases[1]),
                 (new.v_proj, weights[2], biases[2]),
                 (new.out_proj, mha.out_proj.weight, mha.out_proj.bias)]
        with torch.no_grad():
            for lin, weight, b in pairs:
                lin.weight.copy_(weight)
                lin.weight.requires_grad_(weight.requires_grad)
                if b is not None:
                    lin.bias.copy_(b)
        new.train(mha.training)
        return new

    def _heads(self, x: Tensor) -> Tensor:
        # [B, N, H*D] -> [B, H, N, D]; D comes from the tensor, so pruned heads just work
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``.

        Masks: ``True`` (bool) masks a position out; float masks are added to the scores.
        ``attn_mask`` is ``[L, S]`` or ``[batch * num_heads, L, S]``; ``key_padding_mask``
        ``[batch, S]``. ``is_causal`` without ``attn_mask`` builds the causal mask.

        Returns:
            The output, and the attention weights ``[batch, (heads,) L, S]`` (averaged over
            heads when ``average_attn_weights``) or None when not ``need_weights``.
        """
        batched = query.dim() == 3
        query, key, value = (_batch_major(t, batched, self.batch_first)
                             for t in (query, key, value))
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool,
                                   device=scores.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # [B * H, L, S], batch-major as nn.MultiheadAttention
                attn_mask = attn_mask.view(scores.shape)
            scores = _apply_mask(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _apply_mask(scores, key_padding_mask.view(scores.shape[0], 1, 1, -1))
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(2))
        out = out.squeeze(0) if not batched else out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights.squeeze(0)


def _batch_major(x: Tensor, batched: bool, batch_first: bool) -> Tensor:
    """``[B, N, E]`` from a batched input in either layout, or from an unbatched ``[N, E]``."""
    if not batched:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _apply_mask(scores: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def unfuse_mha(model: nn.Module, only: Collection[str] | None = None,
               skip: Collection[str] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """Replace, in place, every ``nn.MultiheadAttention`` by :class:`UnfusedMultiheadAttention`.

    Args:
        model: the model to rewrite (callers pass a copy).
        only: swap exactly these modules (a plan replayed on a fresh model); modules already
            unfused are left as they are.
        skip: names of attention modules to leave fused (excluded by the recipe).

    Returns:
        The names of the swapped modules, and ``{"what", "why"}`` for those left fused
        (they keep their sizes).

    Raises:
        ConfigError: a name in ``only`` is not an attention module of ``model``.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    names = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    if only is not None:
        for n in only:
            if not isinstance(modules.get(n), (nn.MultiheadAttention, UnfusedMultiheadAttention)):
                raise ConfigError(f"the plan unfuses attention module '{n}' that the model does "
                                  "not have as nn.MultiheadAttention; was it made for another "
                                  "model?")
        names = [n for n in names if n in only]
    swapped, skipped, new = [], [], {}  # new: by id, so a module used twice stays shared
    for name in (n for n in names if n not in skip):
        why = unfusable_reason(modules[name]) if name else \
            "the model itself is an nn.MultiheadAttention; wrap it in a module"
        if why is not None:
            skipped.append({"what": f"attention {name or '<root>'}", "why": why})
            continue
        mha = modules[name]
        if id(mha) not in new:
            new[id(mha)] = UnfusedMultiheadAttention.from_mha(mha)
        replace_module(model, name, new[id(mha)])
        swapped.append(name)
    _disable_nested_tensors(model)
    return swapped, skipped


def _disable_nested_tensors(model: nn.Module) -> None:
    """nn.TransformerEncoder's nested-tensor path reads ``in_proj_weight``: keep it off."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and m.layers and \
                isinstance(getattr(m.layers[0], "self_attn", None), UnfusedMultiheadAttention):
            m.use_nested_tensor = False


__all__ = ["UnfusedMultiheadAttention", "unfusable_reason", "unfuse_mha"]
