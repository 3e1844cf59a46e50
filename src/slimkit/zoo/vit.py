"""A small Vision Transformer for MNIST-sized images.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(ICLR 2021): non-overlapping patches embedded by a strided conv, a learned class token and
learned positional embeddings, pre-norm encoder blocks, and a linear head on the class token.
The defaults (dim 64, depth 4, 4 heads, MLP ratio 2) give about 140k parameters, a size that
trains on MNIST in minutes on a CPU and leaves heads and MLP neurons to prune.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimkit.core.errors import DataError
from slimkit.zoo._common import positive_int, zoo_model
from slimkit.zoo.transformer import check_transformer_kwargs, encoder_blocks, init_transformer


def default_patch_size(height: int, width: int) -> int:
    """The largest divisor of ``gcd(height, width)`` not above ``max(7, min(height, width) // 16)``.

    This gives 7 for 28x28 (a 4x4 grid), 4 for 8x8 (2x2) and 32x32 (8x8), and 14 for 224x224
    (16x16): short sequences on small images, ViT-like grids on large ones.
    """
    limit = max(7, min(height, width) // 16)
    side = math.gcd(height, width)
    return max(p for p in range(1, min(limit, side) + 1) if side % p == 0)


class VisionTransformer(nn.Module):
    """ViT: patch embed -> [cls] + patches + positions -> encoder -> LayerNorm -> head(cls).

    Args:
        channels: input channels.
        grid: number of patches along H and W.
        patch_size: patch side in pixels.
        num_classes: size of the logits.
        dim, depth, heads, mlp_ratio: token width, number of blocks, heads per block, and MLP
            hidden size as a multiple of ``dim``.
    """

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        self.blocks = encoder_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@zoo_model("vit")
def vit(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """A small Vision Transformer (Dosovitskiy et al. 2021) for ``(C, H, W)`` images.

    Args:
        input_shape: ``(C, H, W)``; H and W must be divisible by ``patch_size``.
        num_classes: size of the logits.
        patch_size: patch side; None picks :func:`default_patch_size` (7 for 28x28, 4 for 8x8).
        dim: token width; must be divisible by ``heads``.
        depth: number of encoder blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of ``dim``.

    Raises:
        DataError: for inputs that are not ``(C, H, W)`` or not divisible into patches.
        ConfigError: for non-positive sizes or ``dim`` not divisible by ``heads``.

    Example:
        >>> model = vit((1, 28, 28), 10)  # 16 patches of 7x7
    """
    check_transformer_kwargs("vit", dim, depth, heads, mlp_ratio)
    if len(input_shape) != 3:
        raise DataError(
            f"zoo model 'vit' needs images shaped (C, H, W), got input_shape {input_shape}. "
            "For 1-D signals or token sequences use 'text_encoder'."
        )
    channels, height, width = input_shape
    if patch_size is None:
        patch_size = default_patch_size(height, width)
    positive_int("vit", "patch_size", patch_size)
    if height % patch_size or width % patch_size:
        raise DataError(
            f"zoo model 'vit': image size {height}x{width} of input_shape {input_shape} is not "
            f"divisible by patch_size={patch_size}. Pick a patch_size that divides both H and W "
            f"(for example {default_patch_size(height, width)})."
        )
    grid = (height // patch_size, width // patch_size)
    return VisionTransformer(
        channels, grid, patch_size, num_classes, dim, depth, heads, float(mlp_ratio)
    )
