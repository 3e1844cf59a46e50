"""Tensor factorizers of conv kernels: Tucker-2 and CP, computed with tensorly (numpy, float64).

Both keep the input and output channel modes apart from the spatial ones, so that each factor
is itself a convolution and the factorized layer runs on any runtime without custom ops.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from torch import nn

from slimkit.lowrank.base import (
    Factorizer,
    Factors,
    Shape,
    conv_like,
    explicit_padding,
    kernel,
    load,
    register_factorizer,
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tensorly's notice that an SVD init asked for more vectors than a mode has.

    That happens whenever a rank exceeds a kernel side (rank 20 on a 3-wide mode); tensorly
    then fills the extra columns from the seeded random state, which is what we want.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        yield


def mode_unfoldings(w: np.ndarray) -> list[np.ndarray]:
    """Mode-0 ``(C_out, C_in·k…)`` and mode-1 ``(C_in, C_out·k…)`` unfoldings of a kernel."""
    return [w.reshape(w.shape[0], -1), np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)]


@register_factorizer
class Tucker2Factorizer(Factorizer):
    """Tucker-2 on the channel modes, Kim et al. (ICLR 2016).

    ``W ≈ core ×_0 U_out ×_1 U_in`` with ``core`` of shape ``(r_out, r_in, k…)``: a 1x1 conv
    ``C_in -> r_in`` (``U_in^T``), the core as a k×k conv ``r_in -> r_out`` with the original
    stride, padding and dilation, and a 1x1 conv ``r_out -> C_out`` (``U_out``) with the bias.
    The pointwise convs commute with padding, so the result is exact at full rank for every
    padding mode. Factors come from tensorly's ``partial_tucker`` (HOOI, HOSVD init).
    Parameters: ``C_in·r_in + r_in·r_out·prod(k) + r_out·C_out``.
    """

    name = "tucker2"
    rank_length = 2

    def unsupported(self, layer: nn.Module) -> str | None:
        reason = super().unsupported(layer)
        if reason is None and isinstance(layer, nn.Linear):
            return "tucker2 factorizes conv kernels; Linear layers use svd"
        return reason

    def max_rank(self, shape: Shape) -> list[int]:
        k = math.prod(kernel(shape))
        return [min(shape[0], shape[1] * k), min(shape[1], shape[0] * k)]

    def weight_params(self, shape: Shape, rank: Sequence[int]) -> int:
        r_out, r_in = rank
        return shape[1] * r_in + r_in * r_out * math.prod(kernel(shape)) + r_out * shape[0]

    def candidates(self, shape: Shape) -> list[list[int]]:
        # Both ranks grow in proportion to their maxima, so one scalar orders the pairs.
        top = self.max_rank(shape)
        steps = max(top)
        pairs = {(math.ceil(j * top[0] / steps), math.ceil(j * top[1] / steps))
                 for j in range(1, steps + 1)}
        return [list(p) for p in sorted(pairs)]

    def unfoldings(self, w: np.ndarray) -> list[np.ndarray]:
        return mode_unfoldings(w)

    def decompose(self, w: np.ndarray, rank: Sequence[int], n_iter: int = 100, seed: int = 0,
                  tol: float = 1e-6) -> Factors:
        from tensorly.decomposition import partial_tucker

        with _quiet():
            out = partial_tucker(w, rank=list(rank), modes=[0, 1], init="svd",
                                 n_iter_max=n_iter, tol=tol, random_state=seed)
        core, (u_out, u_in) = out[0] if isinstance(out[0], tuple) else out
        return {"core": np.asarray(core), "u_out": np.asarray(u_out), "u_in": np.asarray(u_in)}

    def reconstruct(self, factors: Factors, shape: Shape) -> np.ndarray:
        return np.einsum("ab...,oa,ib->oi...", factors["core"], factors["u_out"],
                         factors["u_in"])

    def shell(self, layer: nn.Module, rank: Sequence[int]) -> nn.Sequential:
        r_out, r_in = rank
        point = (1,) * len(layer.kernel_size)
        first = conv_like(layer, layer.in_channels, r_in, point, bias=False)
        core = conv_like(layer, r_in, r_out, layer.kernel_size, bias=False, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation)
        last = conv_like(layer, r_out, layer.out_channels, point, bias=layer.bias is not None)
        return nn.Sequential(first, core, last)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Sequential:
        out = self.shell(layer, list(factors["core"].shape[:2]))
        load(out[0], factors["u_in"].T)
        load(out[1], factors["core"])
        load(out[2], factors["u_out"], layer.bias)
        return out


@register_factorizer
class CPFactorizer(Factorizer):
    """CP (canonical polyadic) decomposition of a Conv2d kernel, Lebedev et al. (ICLR 2015).

    ``W[o, i, h, w] ≈ sum_r A[o, r] B[i, r] C[h, r] D[w, r]`` becomes a 1x1 conv
    ``C_in -> R`` (B), a depthwise ``kh×1`` conv (C) with the vertical stride/padding/dilation,
    a depthwise ``1×kw`` conv (D) with the horizontal ones, and a 1x1 conv ``R -> C_out`` (A)
    with the bias. Factors come from tensorly's ``parafac`` (CP-ALS, SVD init, seeded); the
    column norms are spread evenly over the four factors so no layer carries a huge scale.
    Parameters: ``R·(C_in + kh + kw + C_out)``. The CP rank is at least each multilinear rank,
    so the energy and VBMF rules take the larger of the two unfolding ranks.
    """

    name = "cp"

    def unsupported(self, layer: nn.Module) -> str | None:
        reason = super().unsupported(layer)
        if reason:
            return reason
        if not isinstance(layer, nn.Conv2d):
            return f"cp factorizes Conv2d kernels, got {type(layer).__name__}"
        if explicit_padding(layer) is None:
            return "padding='same' with an even kernel pads asymmetrically; cannot split it"
        return None

    def max_rank(self, shape: Shape) -> list[int]:
        # Beyond this rank the four factors hold more weights than the dense kernel.
        per_rank = shape[0] + shape[1] + sum(kernel(shape))
        return [max(1, math.prod(shape) // per_rank)]

    def weight_params(self, shape: Shape, rank: Sequence[int]) -> int:
        return rank[0] * (shape[0] + shape[1] + sum(kernel(shape)))

    def unfoldings(self, w: np.ndarray) -> list[np.ndarray]:
        return mode_unfoldings(w)

    def rank_from_unfoldings(self, ranks: list[int]) -> list[int]:
        return [max(ranks)]

    def decompose(self, w: np.ndarray, rank: Sequence[int], n_iter: int = 100, seed: int = 0,
                  tol: float = 1e-6) -> Factors:
        from tensorly.decomposition import parafac

        with _quiet():
            cp = parafac(w, rank=rank[0], n_iter_max=n_iter, init="svd", tol=tol,
                         random_state=seed, normalize_factors=False)
        weights, factors = np.asarray(cp[0]), [np.asarray(f) for f in cp[1]]
        norms = [np.linalg.norm(f, axis=0) for f in factors]
        scale = weights * np.prod(norms, axis=0)
        root = np.abs(scale) ** 0.25
        a, b, c, d = (f / np.where(n > 0, n, 1.0) * root for f, n in zip(factors, norms,
                                                                           strict=True))
        return {"out": a * np.sign(scale + (scale == 0)), "in": b, "vertical": c,
                "horizontal": d}

    def reconstruct(self, factors: Factors, shape: Shape) -> np.ndarray:
        return np.einsum("or,ir,hr,wr->oihw", factors["out"], factors["in"],
                         factors["vertical"], factors["horizontal"])

    def shell(self, layer: nn.Module, rank: Sequence[int]) -> nn.Sequential:
        c_out, c_in, kh, kw = layer.weight.shape
        r = rank[0]
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, explicit_padding(layer)
        first = conv_like(layer, c_in, r, (1, 1), bias=False)
        vertical = conv_like(layer, r, r, (kh, 1), bias=False, stride=(sh, 1),
                             padding=(ph, 0), dilation=(dh, 1), groups=r)
        horizontal = conv_like(layer, r, r, (1, kw), bias=False, stride=(1, sw),
                               padding=(0, pw), dilation=(1, dw), groups=r)
        last = conv_like(layer, r, c_out, (1, 1), bias=layer.bias is not None)
        return nn.Sequential(first, vertical, horizontal, last)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Sequential:
        out = self.shell(layer, [factors["in"].shape[1]])
        load(out[0], factors["in"].T)
        load(out[1], factors["vertical"].T)
        load(out[2], factors["horizontal"].T)
        load(out[3], factors["out"], layer.bias)
        return out
