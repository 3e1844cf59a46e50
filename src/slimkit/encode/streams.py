"""Entropy coding of one symbol stream: canonical Huffman or ANS, whichever is smaller.

A coded stream is self-describing given its coder name and symbol count::

    varint  2*table_len + nib  symbols 0 .. table_len-1 have table entries (trailing
                               never-used symbols are trimmed); nib = 1 when every entry
                               is below 16
    table[table_len]           Huffman: code lengths; ANS: quantized frequencies; as 4-bit
                               nibbles (high nibble first) when nib = 1, else varints
    bytes   data               Huffman: packed bits; ANS: little-endian uint32 words

ANS is ``constriction.stream.stack.AnsCoder`` with a ``Categorical`` model built from the
stored integer frequencies (``perfect=False``), so encoder and decoder build bit-identical
models from the same integers. Frequencies are the exact counts up to 2^14 symbols, and the
counts scaled to a total of 2^14 (each used symbol at least 1) beyond.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from slimkit.encode.huffman import code_lengths, huffman_decode, huffman_encode

StreamCoder = Literal["huffman", "ans", "none"]
ANS_TOTAL = 1 << 14


def write_varints(values: np.ndarray | list[int]) -> bytes:
    """Unsigned LEB128: 7 bits per byte, high bit set on every byte but the last."""
    out = bytearray()
    for v in (int(x) for x in values):
        if v < 0:
            raise ValueError("write_varints: negative value")
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def read_varints(data: bytes, count: int, offset: int = 0) -> tuple[list[int], int]:
    """Read ``count`` LEB128 values from ``data[offset:]``.

    Returns:
        The values and the offset just after them.

    Raises:
        ValueError: the data ends inside a value.
    """
    values = []
    for _ in range(count):
        v, shift = 0, 0
        while True:
            if offset >= len(data) or shift > 63:
                raise ValueError("varint table is truncated")
            b = data[offset]
            offset += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        values.append(v)
    return values, offset


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical zero-order entropy of the stream, in bits in total (``n * H``)."""
    symbols = np.asarray(symbols)
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.astype(np.int64))
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def write_table(entries: np.ndarray) -> bytes:
    """A code table (lengths or frequencies), trailing zeros trimmed, in nibbles if small."""
    entries = np.asarray(entries, dtype=np.int64)
    used = np.flatnonzero(entries)
    entries = entries[:int(used[-1]) + 1] if used.size else entries[:0]
    if entries.size and entries.max() < 16:
        padded = np.append(entries, 0) if entries.size % 2 else entries
        packed = (padded[0::2] << 4) | padded[1::2]
        return write_varints([2 * len(entries) + 1]) + packed.astype(np.uint8).tobytes()
    return write_varints([2 * len(entries)]) + write_varints(entries)


def read_table(data: bytes) -> tuple[np.ndarray, int]:
    """Inverse of :func:`write_table`: the entries and the offset just after them.

    Raises:
        ValueError: the table is truncated.
    """
    (head,), offset = read_varints(data, 1)
    size = head >> 1
    if head & 1:
        end = offset + (size + 1) // 2
        if end > len(data):
            raise ValueError("nibble table is truncated")
        packed = np.frombuffer(data[offset:end], dtype=np.uint8).astype(np.int64)
        return np.stack([packed >> 4, packed & 15], axis=1).ravel()[:size], end
    values, offset = read_varints(data, size, offset)
    return np.array(values, dtype=np.int64), offset


def ans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies for the ANS model: the counts, or scaled to :data:`ANS_TOTAL`."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total <= ANS_TOTAL:
        return counts
    scaled = np.round(counts * (ANS_TOTAL / total)).astype(np.int64)
    return np.where(counts > 0, np.maximum(scaled, 1), 0)


def _ans_model(freqs: np.ndarray) -> Any:
    import constriction

    probs = np.asarray(freqs, dtype=np.float64) / float(np.sum(freqs))
    if len(probs) < 2:  # a one-symbol alphabet is not a valid Categorical: add an unused one
        probs = np.append(probs, 0.0)
    return constriction.stream.model.Categorical(probs, perfect=False)


def ans_encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """ANS-code ``symbols`` (each with a positive frequency) as little-endian uint32 words."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.asarray(symbols, dtype=np.int32), _ans_model(freqs))
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(data: bytes, freqs: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols coded by :func:`ans_encode` with the same frequencies.

    Raises:
        ValueError: the data is not a whole number of 32-bit words.
    """
    import constriction

    if len(data) % 4:
        raise ValueError("ANS data is not a whole number of 32-bit words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    return np.asarray(coder.decode(_ans_model(freqs), count), dtype=np.int64)


def encode_stream(symbols: np.ndarray, coder: Literal["auto", "huffman", "ans"] = "auto",
                  ) -> tuple[StreamCoder, bytes]:
    """Entropy-code a stream of small non-negative integers.

    Args:
        symbols: 1-D integer array.
        coder: ``huffman``, ``ans``, or ``auto`` (both, keep the smaller; Huffman on a tie).

    Returns:
        ``(coder used, coded bytes)``; an empty stream is ``("none", b"")``.
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return "none", b""
    counts = np.bincount(symbols)
    options: list[tuple[StreamCoder, bytes]] = []
    if coder in ("auto", "huffman"):
        lengths = code_lengths(counts)
        options.append(("huffman", write_table(lengths) + huffman_encode(symbols, lengths)))
    if coder in ("auto", "ans"):
        freqs = ans_frequencies(counts)
        options.append(("ans", write_table(freqs) + ans_encode(symbols, freqs)))
    return min(options, key=lambda o: len(o[1]))


def decode_stream(data: bytes, coder: str, count: int) -> np.ndarray:
    """Inverse of :func:`encode_stream`.

    Raises:
        ValueError: unknown coder, or data that does not decode to ``count`` valid symbols.
    """
    if coder == "none" or count == 0:
        if data or count:
            raise ValueError(f"an empty stream must have no data and no symbols ({coder})")
        return np.zeros(0, dtype=np.int64)
    entries, offset = read_table(data)
    if coder == "huffman":
        if count > 8 * (len(data) - offset):  # every Huffman code is at least one bit long
            raise ValueError(f"{len(data) - offset} bytes cannot hold {count} Huffman codes")
        symbols = huffman_decode(data[offset:], entries, count)
    elif coder == "ans":
        if entries.sum() <= 0:
            raise ValueError("ANS frequency table is empty")
        symbols = ans_decode(data[offset:], entries, count)
    else:
        raise ValueError(f"unknown stream coder '{coder}'")
    if symbols.size != count or (symbols.size and (
            symbols.min() < 0 or symbols.max() >= len(entries) or (entries[symbols] == 0).any())):
        raise ValueError(f"{coder} stream decodes to symbols outside its table")
    return symbols
