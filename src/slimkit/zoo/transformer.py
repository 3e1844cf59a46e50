"""Pre-norm transformer encoder blocks shared by the ViT and the text encoder.

Vaswani et al., "Attention Is All You Need" (NeurIPS 2017), with the pre-norm placement of
Xiong et al., "On Layer Normalization in the Transformer Architecture" (ICML 2020) used by ViT.

Attention is written with four ``nn.Linear`` layers (q, k, v, out) and explicit matmuls rather
than ``nn.MultiheadAttention``: pruning and low-rank tools can then see and slice each
projection, and a head is a contiguous block of ``head_dim`` rows of q/k/v and columns of out.
The head size is read from the tensor at run time, so removing whole heads only requires
slicing the four linears and lowering ``num_heads``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimkit.core.errors import ConfigError
from slimkit.zoo._common import positive_float, positive_int


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product self-attention over ``[batch, tokens, dim]``.

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        # [B, N, H*D] -> [B, H, N, D]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        context = torch.matmul(scores.softmax(dim=-1), v)
        return self.out(context.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def encoder_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    """``depth`` encoder blocks of width ``dim`` with MLP hidden size ``round(dim * mlp_ratio)``."""
    hidden = max(1, round(dim * mlp_ratio))
    return nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))


def check_transformer_kwargs(
    model: str, dim: int, depth: int, heads: int, mlp_ratio: float
) -> None:
    """Validate the kwargs both transformer models share.

    Raises:
        ConfigError: for non-positive sizes or a ``dim`` not divisible by ``heads``.
    """
    positive_int(model, "dim", dim)
    positive_int(model, "depth", depth)
    positive_int(model, "heads", heads)
    positive_float(model, "mlp_ratio", mlp_ratio)
    if dim % heads:
        raise ConfigError(
            f"zoo model '{model}': dim={dim} must be divisible by heads={heads} "
            f"(each head gets dim // heads features)"
        )


def init_transformer(module: nn.Module) -> None:
    """ViT-style initialization: truncated normal (std 0.02) linears and embeddings, zero biases.

    Small random weights keep every residual branch close to the identity at the start, which
    is what lets pre-norm transformers train without warm-up tricks at this size.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
