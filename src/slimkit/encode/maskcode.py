"""Sparse positions as a bitmask coded with an adaptive per-column model and ANS.

Pruning leaves structure that relative offsets (sparse.py) cannot see: an input pixel that is
always blank, or a hidden unit that lost its outputs, has (almost) every weight of its column
pruned, while a useful input keeps many. The tensor is viewed as a matrix -- rows are the
output units (``shape[0]``), columns everything else, or the transpose -- and the bits are
coded row after row. The probability that bit ``(r, c)`` is kept is a Krichevsky-Trofimov-like
estimate from the column's history, shrunk towards the tensor's density ``p``::

    q(r, c) = (ones_c(r) + alpha * p) / (r + alpha)          ones_c(r): kept bits above row r

so the first rows cost what an i.i.d. model costs and a column's own rate takes over as rows
go by; ``alpha`` (how much history outweighs the prior) and the orientation are chosen by the
encoder from a small set, whichever codes smallest, and stored. The probabilities are
computed from integers by the same float64 expression on both sides, and the bits are coded
with ``constriction``'s ANS coder under a ``Bernoulli`` model, so decoding (row by row) is
exact.
"""

from __future__ import annotations

import numpy as np

ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0)
Q_MIN = 2.0 ** -20  # probabilities are kept inside (0, 1) so every symbol stays codable


def as_matrix(numel: int, shape: list[int], transpose: bool) -> tuple[int, int]:
    """``(rows, cols)`` of the coding matrix for a tensor of ``shape``."""
    rows = int(shape[0]) if shape else 1
    cols = numel // max(1, rows)
    return (cols, rows) if transpose else (rows, cols)


def _probs(ones: np.ndarray, row: int, alpha: float, p: float) -> np.ndarray:
    """Probability of a kept bit in each column of row ``row`` (same on both sides)."""
    q = (ones.astype(np.float64) + alpha * p) / (float(row) + alpha)
    return np.clip(q, Q_MIN, 1.0 - Q_MIN)


def _all_probs(mask: np.ndarray, alpha: float, p: float) -> np.ndarray:
    """:func:`_probs` for every row at once (the encoder's view; identical values)."""
    ones = np.cumsum(mask, axis=0, dtype=np.int64) - mask
    rows = np.arange(mask.shape[0], dtype=np.float64)[:, None]
    q = (ones.astype(np.float64) + alpha * p) / (rows + alpha)
    return np.clip(q, Q_MIN, 1.0 - Q_MIN)


def mask_cost(mask: np.ndarray, alpha: float, p: float) -> float:
    """Ideal code length of ``mask`` (rows x cols, bool) in bits under the model."""
    q = _all_probs(mask, alpha, p)
    return float(-np.where(mask, np.log2(q), np.log2(1.0 - q)).sum())


def mask_bound(flat_mask: np.ndarray, shape: list[int], params: dict) -> float:
    """Ideal code length in bits of a mask under the chosen model (the coder's target)."""
    numel = flat_mask.size
    rows, cols = as_matrix(numel, shape, bool(params["transpose"]))
    m = flat_mask.reshape(cols, rows).T if params["transpose"] else flat_mask.reshape(rows, cols)
    return mask_cost(np.ascontiguousarray(m), float(params["alpha"]),
                     float(flat_mask.sum()) / max(1, numel))


def _model():  # noqa: ANN202
    import constriction

    return constriction.stream.model.Bernoulli(perfect=False)


def encode_mask(flat_mask: np.ndarray, shape: list[int]) -> tuple[bytes, dict]:
    """Code a tensor's keep-mask; choose orientation and ``alpha`` by the ideal code length.

    Args:
        flat_mask: bool array, the flattened tensor's ``!= 0``.
        shape: the tensor's shape.

    Returns:
        ``(bytes, params)`` with ``params = {"transpose", "alpha"}`` for :func:`decode_mask`.
    """
    import constriction

    numel = flat_mask.size
    p = float(flat_mask.sum()) / max(1, numel)
    best = None
    for transpose in (False, True):
        rows, cols = as_matrix(numel, shape, transpose)
        m = flat_mask.reshape(rows, cols) if not transpose else \
            flat_mask.reshape(cols, rows).T
        m = np.ascontiguousarray(m)
        for alpha in ALPHAS:
            cost = mask_cost(m, alpha, p)
            if best is None or cost < best[0]:
                best = (cost, transpose, alpha, m)
    assert best is not None
    _, transpose, alpha, m = best
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(m.ravel().astype(np.int32), _model(),
                         _all_probs(m, alpha, p).ravel())
    data = coder.get_compressed().astype("<u4").tobytes()
    return data, {"transpose": bool(transpose), "alpha": alpha}


def decode_mask(data: bytes, shape: list[int], nonzero: int, params: dict) -> np.ndarray:
    """Inverse of :func:`encode_mask`: the flat bool mask.

    Raises:
        ValueError: data that is not whole 32-bit words or does not give ``nonzero`` bits.
    """
    import constriction

    if len(data) % 4:
        raise ValueError("mask data is not a whole number of 32-bit words")
    numel = int(np.prod(shape)) if shape else 1
    transpose, alpha = bool(params["transpose"]), float(params["alpha"])
    if alpha not in ALPHAS:
        raise ValueError(f"unknown mask model alpha {alpha}")
    rows, cols = as_matrix(numel, shape, transpose)
    p = float(nonzero) / max(1, numel)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    model = _model()
    out = np.zeros((rows, cols), dtype=bool)
    ones = np.zeros(cols, dtype=np.int64)
    for r in range(rows):
        bits = np.asarray(coder.decode(model, _probs(ones, r, alpha, p)), dtype=bool)
        out[r] = bits
        ones += bits
    if int(out.sum()) != nonzero:
        raise ValueError(f"mask decodes to {int(out.sum())} kept weights, expected {nonzero}")
    return (out.T if transpose else out).ravel()
