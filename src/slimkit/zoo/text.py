"""A small transformer encoder for sequences: token ids, or float data read as a sequence.

The blocks are the ViT's (:mod:`slimkit.zoo.transformer`), so attention-head pruning, low-rank
factorization and quantization treat both models the same way. Differences from the ViT: the
tokens come from an ``nn.Embedding`` (int64 ids) or a linear token embedding (float data), and
the logits come from mean pooling over tokens rather than a class token, as in sentence
classifiers built on BERT-style encoders (Devlin et al. 2019; Reimers and Gurevych 2019).

How float inputs become tokens:

* ``(C, H, W)`` images: one token per row, ``H`` tokens of ``C * W`` features (the classic
  "MNIST as a sequence of rows" setup of sequence-model benchmarks);
* ``(C, L)`` signals: ``L`` tokens of ``C`` features;
* ``(L,)`` signals such as MNIST-1D: ``L`` tokens of 1 feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.zoo._common import positive_int, zoo_model
from slimkit.zoo.transformer import check_transformer_kwargs, encoder_blocks, init_transformer

_DTYPES = ("float32", "int64")


class ToTokens(nn.Module):
    """Rearrange one batch of float samples into ``[batch, tokens, features]`` (no weights).

    Args:
        rank: rank of one sample: 3 (``(C, H, W)``), 2 (``(C, L)``) or 1 (``(L,)``).
    """

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, x: Tensor) -> Tensor:
        if self.rank == 3:
            return x.transpose(1, 2).flatten(2)  # [B, C, H, W] -> [B, H, C * W]
        if self.rank == 2:
            return x.transpose(1, 2)  # [B, C, L] -> [B, L, C]
        return x.unsqueeze(-1)  # [B, L] -> [B, L, 1]


def _sequence_layout(input_shape: tuple[int, ...], input_dtype: str) -> tuple[int, int]:
    """Return ``(tokens, features per token)``; features is 0 for int64 token ids."""
    if input_dtype == "int64":
        if len(input_shape) != 1:
            raise DataError(
                f"zoo model 'text_encoder' with input_dtype='int64' needs token ids shaped (L,), "
                f"got input_shape {input_shape}. Use input_dtype='float32' for float data."
            )
        return input_shape[0], 0
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return height, channels * width
    if len(input_shape) == 2:
        return input_shape[1], input_shape[0]
    if len(input_shape) == 1:
        return input_shape[0], 1
    raise DataError(
        f"zoo model 'text_encoder' takes (C, H, W), (C, L) or (L,) inputs, got input_shape "
        f"{input_shape}. Reshape the data to one of these layouts."
    )


class TextEncoder(nn.Module):
    """Token embedding + positions -> pre-norm encoder -> LayerNorm -> mean over tokens -> head.

    Args:
        embed: maps one batch of inputs to ``[batch, tokens, dim]``.
        tokens: sequence length (fixed: the positional embedding is learned).
        num_classes: size of the logits.
        dim, depth, heads, mlp_ratio: as in :class:`slimkit.zoo.vit.VisionTransformer`.
    """

    def __init__(
        self,
        embed: nn.Module,
        tokens: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = encoder_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@zoo_model("text_encoder")
def text_encoder(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    input_dtype: str = "float32",
    vocab_size: int = 256,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """A small transformer encoder classifier for token ids or float sequences.

    Args:
        input_shape: ``(L,)`` token ids when ``input_dtype="int64"``; otherwise ``(C, H, W)``,
            ``(C, L)`` or ``(L,)`` float data (see the module docstring for the token layout).
        num_classes: size of the logits.
        input_dtype: ``"int64"`` for token ids (``nn.Embedding``) or ``"float32"`` (linear
            token embedding).
        vocab_size: number of token ids for ``input_dtype="int64"``; ids must lie in
            ``[0, vocab_size)``. Ignored for float inputs.
        dim: token width; must be divisible by ``heads``.
        depth: number of encoder blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of ``dim``.

    Raises:
        ConfigError: for an unknown ``input_dtype`` or invalid sizes.
        DataError: for int64 inputs that are not ``(L,)`` or an unsupported input rank.

    Example:
        >>> model = text_encoder((64,), 2, input_dtype="int64", vocab_size=1000)
    """
    if input_dtype not in _DTYPES:
        raise ConfigError(
            f"zoo model 'text_encoder': kwarg 'input_dtype' must be one of "
            f"{', '.join(_DTYPES)}, got {input_dtype!r}"
        )
    check_transformer_kwargs("text_encoder", dim, depth, heads, mlp_ratio)
    tokens, features = _sequence_layout(input_shape, input_dtype)
    if input_dtype == "int64":
        embed: nn.Module = nn.Embedding(positive_int("text_encoder", "vocab_size", vocab_size), dim)
    else:
        embed = nn.Sequential(ToTokens(len(input_shape)), nn.Linear(features, dim))
    return TextEncoder(embed, tokens, num_classes, dim, depth, heads, float(mlp_ratio))
