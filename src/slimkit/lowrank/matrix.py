"""Factorizers built on one truncated SVD: ``svd`` (Linear and conv) and ``spatial`` (conv2d).

By Eckart–Young, truncating the SVD is the best rank-r approximation in Frobenius norm, so the
relative error is exactly ``sqrt(sum of discarded sigma^2) / ||W||_F``. The singular values
are split as ``sqrt(S)`` on both factors so that the two layers have comparable scales, which
keeps fine-tuning well conditioned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from slimkit.lowrank.base import (
    Factorizer,
    Factors,
    Shape,
    conv_like,
    explicit_padding,
    load,
    register_factorizer,
)


def truncated_svd(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A @ B`` the best rank-``rank`` approximation of ``m``.

    ``A = U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T``.
    """
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


@register_factorizer
class SVDFactorizer(Factorizer):
    """Truncated SVD of ``W`` reshaped to ``(C_out, C_in·prod(k))`` (Denton et al. 2014).

    Linear ``y = W x + b`` becomes ``Linear(n, r, bias=False) -> Linear(r, m)``. A conv becomes
    a k×k conv to ``r`` channels (keeping stride, padding, dilation) followed by a 1x1 conv with
    the bias: the channel decomposition of Zhang et al. (2015) without its nonlinear step.
    Parameters: ``r·(m + n)`` instead of ``m·n``.
    """

    name = "svd"

    def max_rank(self, shape: Shape) -> list[int]:
        return [min(shape[0], int(np.prod(shape[1:])))]

    def weight_params(self, shape: Shape, rank: Sequence[int]) -> int:
        return rank[0] * (shape[0] + int(np.prod(shape[1:])))

    def unfoldings(self, w: np.ndarray) -> list[np.ndarray]:
        return [w.reshape(w.shape[0], -1)]

    def decompose(self, w: np.ndarray, rank: Sequence[int], n_iter: int = 100, seed: int = 0,
                  tol: float = 1e-6) -> Factors:
        a, b = truncated_svd(w.reshape(w.shape[0], -1), rank[0])
        return {"u": a, "v": b}

    def reconstruct(self, factors: Factors, shape: Shape) -> np.ndarray:
        return (factors["u"] @ factors["v"]).reshape(shape)

    def shell(self, layer: nn.Module, rank: Sequence[int]) -> nn.Sequential:
        r, w = rank[0], layer.weight
        if isinstance(layer, nn.Linear):
            first = nn.Linear(layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
            second = nn.Linear(r, layer.out_features, bias=layer.bias is not None,
                               device=w.device, dtype=w.dtype)
        else:
            first = conv_like(layer, layer.in_channels, r, layer.kernel_size, bias=False,
                              stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            second = conv_like(layer, r, layer.out_channels, (1,) * len(layer.kernel_size),
                               bias=layer.bias is not None)
        return nn.Sequential(first, second)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Sequential:
        out = self.shell(layer, [factors["u"].shape[1]])
        load(out[0], factors["v"])
        load(out[1], factors["u"], layer.bias)
        return out


@register_factorizer
class SpatialFactorizer(Factorizer):
    """Spatially separable filters, Jaderberg, Vedaldi and Zisserman (BMVC 2014), scheme 2.

    A ``kh×kw`` conv becomes a ``kh×1`` conv from ``C_in`` to ``r`` channels followed by a
    ``1×kw`` conv from ``r`` to ``C_out``. With ``M[(i, h), (o, w)] = W[o, i, h, w]``, the
    composite kernel is ``sum_r V[r, i, h] H[o, r, w]``, a rank-r factorization of ``M``, so
    the SVD of ``M`` (shape ``(C_in·kh, C_out·kw)``) gives the optimal filters. Parameters:
    ``r·(C_in·kh + C_out·kw)``.
    """

    name = "spatial"

    def unsupported(self, layer: nn.Module) -> str | None:
        reason = super().unsupported(layer)
        if reason:
            return reason
        if not isinstance(layer, nn.Conv2d):
            return f"spatial factorization needs a Conv2d, got {type(layer).__name__}"
        if min(layer.kernel_size) < 2:
            return f"kernel {tuple(layer.kernel_size)} is already separable (a side is 1)"
        if explicit_padding(layer) is None:
            return "padding='same' with an even kernel pads asymmetrically; cannot split it"
        return None

    def max_rank(self, shape: Shape) -> list[int]:
        c_out, c_in, kh, kw = shape
        return [min(c_in * kh, c_out * kw)]

    def weight_params(self, shape: Shape, rank: Sequence[int]) -> int:
        c_out, c_in, kh, kw = shape
        return rank[0] * (c_in * kh + c_out * kw)

    def unfoldings(self, w: np.ndarray) -> list[np.ndarray]:
        c_out, c_in, kh, kw = w.shape
        return [w.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)]

    def decompose(self, w: np.ndarray, rank: Sequence[int], n_iter: int = 100, seed: int = 0,
                  tol: float = 1e-6) -> Factors:
        vertical, horizontal = truncated_svd(self.unfoldings(w)[0], rank[0])
        return {"vertical": vertical, "horizontal": horizontal}

    def reconstruct(self, factors: Factors, shape: Shape) -> np.ndarray:
        c_out, c_in, kh, kw = shape
        m = factors["vertical"] @ factors["horizontal"]
        return m.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3)

    def shell(self, layer: nn.Module, rank: Sequence[int]) -> nn.Sequential:
        c_out, c_in, kh, kw = layer.weight.shape
        r = rank[0]
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, explicit_padding(layer)
        first = conv_like(layer, c_in, r, (kh, 1), bias=False, stride=(sh, 1),
                          padding=(ph, 0), dilation=(dh, 1))
        second = conv_like(layer, r, c_out, (1, kw), bias=layer.bias is not None,
                           stride=(1, sw), padding=(0, pw), dilation=(1, dw))
        return nn.Sequential(first, second)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Sequential:
        c_out, c_in, kh, kw = layer.weight.shape
        r = factors["vertical"].shape[1]
        v = factors["vertical"].T.reshape(r, c_in, kh, 1)
        h = factors["horizontal"].reshape(r, c_out, kw).transpose(1, 0, 2)[:, :, None, :]
        out = self.shell(layer, [r])
        load(out[0], v)
        load(out[1], h, layer.bias)
        return out
