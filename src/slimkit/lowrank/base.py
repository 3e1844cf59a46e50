"""The factorizer interface, its registry, and helpers to build the replacement layers.

A factorizer turns one dense weight (numpy float64) into factors at a given rank, recomposes
them, counts their parameters, and builds the ``nn.Sequential`` that replaces the layer. Ranks
are always lists of ints: ``[r]`` for svd, cp and spatial, ``[r_out, r_in]`` for tucker2.

The replacement's structure depends on the layer and the rank only: :meth:`Factorizer.shell`
builds it without values (artifact loading, where the saved weights fill it, runs it on the
``meta`` device), and :meth:`Factorizer.build` fills that same shell with the factors.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from slimkit.core.registry import Registry

Factors = dict[str, np.ndarray]
Shape = tuple[int, ...]
CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
LAYER_TYPES = ("Linear", *CONV_TYPES)


class Factorizer(ABC):
    """One decomposition scheme: decompose, recompose, count, and build the layers.

    Subclasses implement the abstract methods; ``unsupported`` says why a layer cannot be
    handled (grouped convs, kernels of the wrong dimensionality), or returns None.
    """

    name: str = ""
    rank_length: int = 1

    def unsupported(self, layer: nn.Module) -> str | None:
        """Why this factorizer cannot handle ``layer``; None when it can."""
        if type(layer).__name__ not in LAYER_TYPES:
            return (f"{type(layer).__name__} layers cannot be factorized "
                    f"(supported: {', '.join(LAYER_TYPES)})")
        if getattr(layer, "groups", 1) != 1:
            return (f"grouped/depthwise conv (groups={layer.groups}) cannot be factorized: "
                    "its weight is already block-diagonal")
        return None

    @abstractmethod
    def max_rank(self, shape: Shape) -> list[int]:
        """The largest meaningful rank of each component for a weight of ``shape``."""

    @abstractmethod
    def weight_params(self, shape: Shape, rank: Sequence[int]) -> int:
        """Number of weights of the factorized form (biases excluded)."""

    def candidates(self, shape: Shape) -> list[list[int]]:
        """Ranks in increasing size, for the ratio and sensitivity rules."""
        return [[r] for r in range(1, self.max_rank(shape)[0] + 1)]

    @abstractmethod
    def unfoldings(self, w: np.ndarray) -> list[np.ndarray]:
        """Matrices whose spectra drive the energy and VBMF rules (one per rank component)."""

    def rank_from_unfoldings(self, ranks: list[int]) -> list[int]:
        """Combine the ranks found on each unfolding into this factorizer's rank."""
        return ranks

    @abstractmethod
    def decompose(self, w: np.ndarray, rank: Sequence[int], n_iter: int = 100, seed: int = 0,
                  tol: float = 1e-6) -> Factors:
        """Factors of ``w`` (float64) at ``rank``; deterministic for a given seed.

        ``n_iter``, ``seed`` and ``tol`` steer the iterative schemes (CP-ALS, HOOI).
        """

    @abstractmethod
    def reconstruct(self, factors: Factors, shape: Shape) -> np.ndarray:
        """The dense weight the factors represent (float64)."""

    @abstractmethod
    def shell(self, layer: nn.Module, rank: Sequence[int]) -> nn.Sequential:
        """The layers that replace ``layer`` at ``rank``, freshly initialized (no factors).

        Same dtype and device as ``layer``, same input and output; reads only the layer's
        shape and hyperparameters, never its values, so it runs on ``meta`` tensors.
        """

    @abstractmethod
    def build(self, layer: nn.Module, factors: Factors) -> nn.Sequential:
        """:meth:`shell` at the factors' rank, holding the factors (and ``layer``'s bias)."""


FACTORIZERS: Registry[Factorizer] = Registry("factorizer")


def register_factorizer(cls: type[Factorizer]) -> type[Factorizer]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    FACTORIZERS.register(cls.name, cls())
    return cls


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK on one thread inside the block (when threadpoolctl is there).

    The matrices here are small (a layer's weight), where threads cost more than they save:
    on a busy 2-core machine a 64x64x3x3 Tucker-2 took 2.7 s with two OpenBLAS threads and
    0.12 s with one. One thread also makes the decompositions bit-for-bit reproducible across
    thread settings, which is what replaying a plan relies on.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it, numpy keeps its own thread setting
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64 (0 for an all-zero W reproduced exactly)."""
    norm = float(np.linalg.norm(w))
    diff = float(np.linalg.norm(w - w_hat))
    return diff / norm if norm > 0 else diff


def dense_params(shape: Shape) -> int:
    return math.prod(shape)


def kernel(shape: Shape) -> tuple[int, ...]:
    return tuple(shape[2:])


def explicit_padding(layer: nn.Module) -> tuple[int, ...] | None:
    """The conv's padding as per-dim integers (``'valid'`` -> 0; symmetric ``'same'``).

    Returns None for ``'same'`` with an even effective kernel, which PyTorch pads
    asymmetrically and which cannot be split per dimension.
    """
    pad = layer.padding
    if not isinstance(pad, str):
        return tuple(int(p) for p in pad)
    if pad == "valid":
        return (0,) * len(layer.kernel_size)
    out = []
    for k, d in zip(layer.kernel_size, layer.dilation, strict=True):
        total = d * (k - 1)
        if total % 2:
            return None
        out.append(total // 2)
    return tuple(out)


def conv_like(layer: nn.Module, in_ch: int, out_ch: int, kernel_size: Sequence[int],
              bias: bool, stride: Sequence[int] | None = None,
              padding: Sequence[int] | str | None = None, dilation: Sequence[int] | None = None,
              groups: int = 1) -> nn.Module:
    """A conv of the same class, dtype, device and padding mode as ``layer``.

    Stride, padding and dilation default to 1, 0 and 1 (a pointwise conv).
    """
    nd = len(layer.kernel_size)
    return type(layer)(in_ch, out_ch, tuple(kernel_size), stride=tuple(stride or (1,) * nd),
                       padding=padding if padding is not None else (0,) * nd,
                       dilation=tuple(dilation or (1,) * nd), groups=groups, bias=bias,
                       padding_mode=layer.padding_mode, device=layer.weight.device,
                       dtype=layer.weight.dtype)


def load(module: nn.Module, weight: np.ndarray, bias: torch.Tensor | None = None) -> nn.Module:
    """Copy ``weight`` (reshaped to the module's weight) and ``bias`` into ``module``."""
    with torch.no_grad():
        w = torch.from_numpy(np.ascontiguousarray(weight))
        module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
        if bias is not None:
            module.bias.copy_(bias.detach())
    return module
