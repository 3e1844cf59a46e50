"""Canonical Huffman coding: the codebook is stored as one code length per symbol.

Canonical codes are assigned in order of (length, symbol), so the lengths alone rebuild the
code on the decoder side -- the usual trick of DEFLATE and JPEG that Deep Compression's
Huffman stage relies on. Bits are packed most significant first.

Code lengths are limited to :data:`MAX_LEN` bits by halving the counts until the tree is
short enough (the tree stays full, so Kraft's sum stays exactly 1); decoding then uses one
lookup table of ``2^max_len`` entries.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 20


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code length of each symbol from its count (0 for symbols that never occur).

    A single occurring symbol gets length 1. Ties are broken by symbol, so the result is
    deterministic.

    Args:
        counts: non-negative counts, one per symbol of the alphabet.
        max_len: longest code allowed (counts are halved until the tree fits).

    Returns:
        int64 array of lengths, shaped like ``counts``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present] = 1
    if len(present) <= 1:
        return lengths
    work = counts[present].copy()
    while True:
        depth = _tree_depths(work)
        if depth.max() <= max_len:
            lengths[present] = depth
            return lengths
        work = np.maximum(1, work >> 1)


def _tree_depths(counts: np.ndarray) -> np.ndarray:
    """Leaf depths of the Huffman tree over ``counts`` (all positive, at least two)."""
    n = len(counts)
    heap = [(int(c), i, i) for i, c in enumerate(counts)]  # (count, tie-break, node)
    heapq.heapify(heap)
    parent = list(range(2 * n - 1))
    nxt = n
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (c1 + c2, nxt, nxt))
        nxt += 1
    root = nxt - 1
    depth = [0] * (2 * n - 1)
    for node in range(root - 1, -1, -1):  # parents are created after children
        depth[node] = depth[parent[node]] + 1
    return np.array(depth[:n], dtype=np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code (as an integer, MSB first) of each symbol with a non-zero length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        prev = int(lengths[sym])
        codes[sym] = code
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Pack the canonical codes of ``symbols`` into bytes (MSB first, zero padded).

    Raises:
        ValueError: a symbol has no code (length 0).
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    lens = lengths[symbols]
    if (lens == 0).any():
        raise ValueError("huffman_encode: a symbol has no code in the given lengths")
    starts = np.cumsum(lens) - lens
    owner = np.repeat(np.arange(len(symbols)), lens)
    shift = lens[owner] - 1 - (np.arange(int(lens.sum())) - starts[owner])
    bits = (codes[symbols][owner] >> shift) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols from canonical-Huffman ``data``.

    Raises:
        ValueError: the data ends early or holds a bit pattern that is no code.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    max_len = int(lengths.max()) if lengths.size else 0
    if max_len == 0 or max_len > MAX_LEN:
        raise ValueError(f"huffman_decode: invalid code lengths (longest {max_len})")
    codes = canonical_codes(lengths)
    table_sym = np.full(1 << max_len, -1, dtype=np.int64)
    table_len = np.zeros(1 << max_len, dtype=np.int64)
    for sym in np.flatnonzero(lengths):
        lo = int(codes[sym]) << (max_len - int(lengths[sym]))
        hi = (int(codes[sym]) + 1) << (max_len - int(lengths[sym]))
        if hi > len(table_sym):
            raise ValueError("huffman_decode: code lengths violate Kraft's inequality")
        table_sym[lo:hi], table_len[lo:hi] = sym, lengths[sym]
    buf = np.frombuffer(data, dtype=np.uint8).astype(np.uint32)
    buf = np.concatenate([buf, np.zeros(4, dtype=np.uint32)])
    # words[b] = the 32 bits starting at byte b; a code starting at bit p lies in words[p >> 3]
    words = ((buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]).tolist()
    syms, lens = table_sym.tolist(), table_len.tolist()
    mask, total_bits = (1 << max_len) - 1, 8 * len(data)
    out = [0] * count
    pos = 0
    for i in range(count):
        v = (words[pos >> 3] >> (32 - max_len - (pos & 7))) & mask
        out[i] = syms[v]
        pos += lens[v]
        if lens[v] == 0 or pos > total_bits:
            raise ValueError(f"huffman_decode: stream ends or breaks at symbol {i} of {count}")
    return np.array(out, dtype=np.int64)
