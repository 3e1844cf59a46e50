"""Sparse positions as relative offsets with filler entries (Han et al. 2016, figure 3).

The non-zero positions of a flattened tensor are stored as the distance from the previous
stored entry, minus one, in ``index_bits`` bits: an offset ``d`` means "the next entry is
``d + 1`` positions further". A gap longer than ``2^index_bits`` cannot be written in one
offset, so filler entries are inserted, each ``2^index_bits`` positions further with the
largest offset; a filler is a zero-valued entry, marked by the extra cluster symbol ``K``
(one past the last of the ``K`` shared values) in the index stream.

Example: positions [2, 40] with 5-bit offsets (span 32) become offsets [2, 31, 5] and
symbols [s0, K, s1]: 2 -> position 2, 31 -> a filler at 34, 5 -> position 40.
"""

from __future__ import annotations

import numpy as np


def to_relative(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative offsets of ascending ``positions``, with fillers for long gaps.

    Args:
        positions: strictly ascending non-negative int array (flat indices of non-zeros).
        index_bits: bits per offset; offsets lie in ``[0, 2^index_bits)``.

    Returns:
        ``(offsets, is_filler)``, one entry per stored element (real ones and fillers).

    Raises:
        ValueError: positions that are negative or not strictly ascending.
    """
    positions = np.asarray(positions, dtype=np.int64)
    span = 1 << index_bits
    gaps = np.diff(positions, prepend=-1)
    if positions.size and (gaps <= 0).any():
        raise ValueError("to_relative: positions must be non-negative and strictly ascending")
    fillers = (gaps - 1) // span
    counts = fillers + 1
    owner = np.repeat(np.arange(len(positions)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    is_real = within == fillers[owner]
    offsets = np.where(is_real, ((gaps - 1) % span)[owner], span - 1)
    return offsets.astype(np.int64), ~is_real


def from_relative(offsets: np.ndarray, is_filler: np.ndarray) -> np.ndarray:
    """Absolute positions of the real (non-filler) entries.

    Args:
        offsets: relative offsets as written by :func:`to_relative`.
        is_filler: True for filler entries.

    Returns:
        Ascending int64 positions.
    """
    absolute = np.cumsum(np.asarray(offsets, dtype=np.int64) + 1) - 1
    return absolute[~np.asarray(is_filler, dtype=bool)]
