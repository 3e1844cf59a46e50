"""GPTQ: weight quantization with second-order error compensation (Frantar et al., ICLR 2023).

For a Linear layer with weight ``W`` (N x K) and calibration inputs ``X`` (n x K), GPTQ
minimizes ``||X W_q^T - X W^T||^2`` column by column. With ``H = 2 X^T X / n`` (the Hessian of
that loss), quantizing column ``j`` leaves an error ``e_j = (w_j - q_j) / [H_F^-1]_jj`` that
the Optimal Brain Surgeon update spreads over the not-yet-quantized columns ``F``:
``W_F -= e_j [H_F^-1]_{j,F}``. GPTQ gets every ``H_F^-1`` row at once from the upper Cholesky
factor ``U`` of ``H^-1`` (row ``j`` of ``U`` is ``[H_F^-1]_{j,F} / sqrt([H_F^-1]_jj)``), and
applies the updates lazily in blocks of columns so most of the work is a matrix product.

Details kept from the paper and its reference code:

- dampening: ``H += percdamp * mean(diag H) * I``; when ``H`` is still not positive definite
  the dampening is raised tenfold a few times, then the layer falls back to round-to-nearest
  (the reason is recorded);
- columns never activated in calibration (``H_jj = 0``) get ``H_jj = 1``; they are quantized
  to nearest and pass no error on (their weights are kept, not zeroed: unseen inputs may use
  them);
- group qparams are chosen from the error-updated weights when the first column of a group is
  reached; with ``act_order`` (columns in order of decreasing ``H_jj``) the groups keep their
  contiguous layout and their qparams are fixed from the original weights beforehand
  ("static groups"), so the packed format needs no permutation index.

The Hessian is accumulated in float64 from streaming batches (forward hooks): bounded memory,
one K x K matrix per layer.

This is a solver over the group-wise primitives (:mod:`slimkit.quant.primitives`), below the
technique that uses it (:mod:`slimkit.quant.weight_only`); it imports no technique.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import DataError
from slimkit.quant.calibrate import hooked_passes
from slimkit.quant.primitives import group_qparams, pad_columns, quantize_codes, rtn_quantize


class HessianAccumulator:
    """Streaming ``H = 2/n sum_i x_i x_i^T`` over the rows of every batch it is given."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any leading shape, last dim ``in_features``)."""
        x = x.detach().reshape(-1, self.h.shape[0]).to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        self.h *= self.n / (self.n + m)
        self.h += (2.0 / (self.n + m)) * (x.T @ x)
        self.n += m


def collect_hessians(model: nn.Module, names: Iterable[str],
                     batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, HessianAccumulator]:
    """Run ``batches`` through ``model`` and accumulate each named Linear's input Hessian.

    The model's train/eval flags are restored afterwards.

    Returns:
        ``{name: HessianAccumulator}`` for every named layer that was called.
    """
    modules = dict(model.named_modules())
    acc: dict[str, HessianAccumulator] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: tuple) -> None:
            acc.setdefault(name, HessianAccumulator(mod.in_features)).add(args[0])
        return fn

    hooked_passes(model, [modules[n].register_forward_pre_hook(hook(n)) for n in names], batches)
    return acc


@dataclass
class GPTQResult:
    """Codes ``(N, K_padded)`` uint8, scales/zeros ``(N, n_blocks)``, and how it went."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def inverse_cholesky(h: torch.Tensor, percdamp: float, tries: int = 4,
                     ) -> tuple[torch.Tensor | None, float, list[str]]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` tenfold on failure.

    Returns:
        ``(U or None, damp used, notes)``; None when every dampening failed.
    """
    mean = float(torch.diagonal(h).mean()) or 1.0
    damps = [percdamp * mean] + [mean * max(percdamp, 1e-3) * 10.0 ** t
                                 for t in range(1, tries + 1)]
    notes = []
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for damp in damps:
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp, notes
        notes.append(f"H + {damp:.3g} I is not positive definite")
    return None, damps[-1], notes


def _prepare(w: torch.Tensor, h: torch.Tensor, block: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``W`` and ``H`` to whole blocks; dead columns get ``H_jj = 1``."""
    wp = pad_columns(w.detach().to(torch.float64), block)
    kp, k = wp.shape[1], w.shape[1]
    hp = torch.zeros(kp, kp, dtype=torch.float64)
    hp[:k, :k] = h.to(torch.float64)
    dead = torch.diagonal(hp) == 0
    hp[dead, dead] = 1.0
    return wp, hp, dead


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, block: int, symmetric: bool,
                  scale_dtype: str = "float16", percdamp: float = 0.01, blocksize: int = 128,
                  act_order: bool = False, damp_tries: int = 4) -> GPTQResult:
    """Quantize a ``(N, K)`` weight with GPTQ given the input Hessian ``h`` ``(K, K)``.

    Args:
        w: the float weight.
        h: ``2 X^T X / n`` of the layer's calibration inputs.
        bits, block, symmetric, scale_dtype: the packed format (see ``PackedLinear``).
        percdamp: dampening as a fraction of the mean diagonal of ``h``.
        blocksize: columns per lazy batch update (rounded so groups never straddle a batch).
        act_order: process columns by decreasing ``H_jj`` (static group qparams).
        damp_tries: how many times the dampening is raised tenfold before falling back.

    Returns:
        :class:`GPTQResult`; ``info`` holds ``damp``, ``fallback`` (None, or why the layer
        was rounded to nearest instead) and ``notes``.

    Raises:
        DataError: ``h`` holds NaN/Inf.

    Example:
        >>> res = gptq_quantize(layer.weight, acc.h, bits=4, block=128, symmetric=True)
    """
    if not torch.isfinite(h).all():
        raise DataError("GPTQ: the input Hessian holds NaN/Inf; the layer's calibration inputs "
                        "are not finite")
    wp, hp, dead = _prepare(w, h, block)
    n, kp = wp.shape
    nb = kp // block
    perm = (torch.argsort(torch.diagonal(hp), descending=True, stable=True) if act_order
            else torch.arange(kp))
    upper, damp, notes = inverse_cholesky(hp[perm][:, perm], percdamp, damp_tries)
    info: dict[str, Any] = {"damp": damp, "notes": notes, "dead_columns": int(dead.sum()),
                            "act_order": act_order, "fallback": None}
    if upper is None:
        codes, scales, zeros = rtn_quantize(w, bits, block, symmetric, scale_dtype)
        info["fallback"] = ("Hessian not positive definite even with dampening "
                            f"{damp:.3g}: rounded to nearest instead")
        return GPTQResult(codes, scales, zeros, info)
    scales = torch.zeros(n, nb, dtype=torch.float32)
    zeros = torch.zeros(n, nb, dtype=torch.int32)
    if act_order:  # static groups: qparams from the original weights
        scales, zeros = group_qparams(wp.view(n, nb, block), bits, symmetric, scale_dtype)
    wq = _columns(wp[:, perm].clone(), upper, perm, scales, zeros, bits, block, symmetric,
                  scale_dtype, act_order, _fit_blocksize(blocksize, block))
    codes = torch.empty_like(wq)
    codes[:, perm] = wq
    return GPTQResult(codes.to(torch.uint8), scales, zeros, info)


def _fit_blocksize(blocksize: int, block: int) -> int:
    """A lazy-batch size that is a multiple or a divisor of the group size."""
    if blocksize % block == 0 or block % blocksize == 0:
        return blocksize
    return max(block, (blocksize // block) * block)


def _columns(w: torch.Tensor, upper: torch.Tensor, perm: torch.Tensor, scales: torch.Tensor,
             zeros: torch.Tensor, bits: int, block: int, symmetric: bool, scale_dtype: str,
             act_order: bool, bs: int) -> torch.Tensor:
    """The column loop with lazy batch updates; fills ``scales``/``zeros`` in place."""
    n, kp = w.shape
    q_all = torch.zeros(n, kp, dtype=torch.float64)
    for i1 in range(0, kp, bs):
        i2 = min(i1 + bs, kp)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            orig = int(perm[i1 + i])
            g = orig // block
            if not act_order and orig % block == 0:
                # group qparams from the weights as updated so far (whole group in reach)
                src = w1[:, i:i + block] if i + block <= i2 - i1 else w[:, i1 + i:i1 + i + block]
                s, z = group_qparams(src, bits, symmetric, scale_dtype)
                scales[:, g], zeros[:, g] = s, z
            s, z = scales[:, g].double(), zeros[:, g].double()
            col = w1[:, i]
            q = quantize_codes(col, s, z, bits)
            q_all[:, i1 + i] = q
            e = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return q_all


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error ``||X (W_hat - W)^T|| / ||X W^T||`` from ``H = 2 X^T X / n``."""
    d = (w_hat - w).to(torch.float64)
    w64 = w.to(torch.float64)
    h64 = h.to(torch.float64)
    num = float(torch.einsum("nk,kl,nl->", d, h64, d))
    den = float(torch.einsum("nk,kl,nl->", w64, h64, w64))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
