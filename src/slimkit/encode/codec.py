"""Lossless coding of one tensor: shared weights (codebook + coded streams) or raw bytes.

A weight tensor whose non-zero values take few distinct values is stored as::

    codebook   the K distinct non-zero values, ascending (float32, or float16 when every
               value is exactly a float16), as varint gaps between order-preserving keys
    positions  the relative position offsets with fillers (see sparse.py)
    index      one symbol per stored entry whose offset is below the largest: the value's
               rank in the codebook
    index_max  the same for entries at the largest offset: a rank, or K for a filler

each stream entropy coded on its own (see streams.py).

Decoding reproduces the tensor bit for bit (same float32 values at the same positions, +0.0
elsewhere). Every other tensor (biases, BatchNorm statistics, integer buffers) is stored raw,
in its own dtype, little-endian, so it too comes back exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimkit.encode.config import Coder
from slimkit.encode.sparse import from_relative, to_relative
from slimkit.encode.streams import (
    decode_stream,
    encode_stream,
    entropy_bits,
    read_varints,
    write_varints,
)

_FLOAT = {"float16": ("<f2", np.uint16, 16), "float32": ("<f4", np.uint32, 32)}


def write_codebook(codebook: np.ndarray, dtype: str) -> tuple[str, bytes]:
    """An ascending codebook as varint deltas of order-preserving integer keys of its floats.

    A float's bits, with the sign bit flipped for positives and all bits flipped for
    negatives, are an unsigned integer that sorts like the float; an ascending codebook then
    has small non-negative key gaps (about one byte each for densely spaced centroids).
    float16 is used only when every value survives the round trip exactly.

    Returns:
        ``(dtype used, bytes)``.
    """
    if dtype == "float16" and not np.array_equal(
            codebook.astype(np.float16).astype(np.float32), codebook):
        dtype = "float32"
    fmt, uint, width = _FLOAT[dtype]
    bits = codebook.astype(fmt).view(uint).astype(np.int64)
    sign = 1 << (width - 1)
    keys = np.where(bits & sign, ~bits & (2 * sign - 1), bits | sign)
    return dtype, write_varints(np.diff(keys, prepend=0))


def read_codebook(data: bytes, count: int, dtype: str) -> tuple[np.ndarray, int]:
    """Inverse of :func:`write_codebook`: float32 values and the offset after them.

    Raises:
        ValueError: unknown dtype, or a truncated or non-ascending codebook.
    """
    if dtype not in _FLOAT:
        raise ValueError(f"unknown codebook dtype '{dtype}'")
    fmt, uint, width = _FLOAT[dtype]
    deltas, end = read_varints(data, count)
    keys = np.cumsum(np.array(deltas, dtype=np.int64))
    sign = 1 << (width - 1)
    if keys.size and (keys[-1] >= 2 * sign or (keys.size > 1 and deltas[1:].count(0))):
        raise ValueError("codebook keys are out of range or not strictly ascending")
    bits = np.where(keys & sign, keys ^ sign, ~keys & (2 * sign - 1))
    return bits.astype(uint).view(fmt).astype(np.float32), end


STREAMS = ("positions", "index", "index_max")
MAX_NUMEL = 1 << 34  # refuse to allocate more for one tensor (a damaged or crafted file)


def encode_shared(weight: torch.Tensor, index_bits: int, coder: Coder = "auto",
                  codebook_dtype: str = "float32") -> tuple[bytes, dict[str, Any], dict]:
    """Encode a float32 tensor by its distinct non-zero values, positions and indices.

    Entries whose offset is the largest one (``2^index_bits - 1``) are the only ones that can
    be fillers, so their index symbols go to a stream of their own (``index_max``): the coder
    conditions on the offset, a filler costs almost nothing there, and the ``index`` stream
    of the other entries never spends probability on the filler symbol.

    Args:
        weight: float32 tensor (ideally with few distinct non-zero values: clustered).
        index_bits: bits per relative position offset.
        coder: ``auto``, ``huffman`` or ``ans``, for each symbol stream.
        codebook_dtype: ``float32`` or ``float16`` (used only when exact).

    Returns:
        ``(payload, meta, stats)``: the bytes; what the decoder needs (JSON); sizes, bits per
        weight and the empirical entropy bound of the coded streams.
    """
    w = weight.detach().cpu().contiguous().view(-1).numpy().astype(np.float32, copy=False)
    positions = np.flatnonzero(w)
    values = w[positions]
    codebook = np.unique(values)
    k = len(codebook)
    offsets, is_filler = to_relative(positions, index_bits)
    symbols = np.full(len(offsets), k, dtype=np.int64)
    symbols[~is_filler] = np.searchsorted(codebook, values)
    at_max = offsets == (1 << index_bits) - 1
    book_dtype, book = write_codebook(codebook, codebook_dtype)
    raw = {"positions": offsets, "index": symbols[~at_max], "index_max": symbols[at_max]}
    coded = {name: encode_stream(raw[name], coder) for name in STREAMS}
    payload = book + b"".join(coded[name][1] for name in STREAMS)
    meta = {"encoding": "shared", "shape": list(weight.shape), "clusters": k,
            "codebook": book_dtype, "codebook_bytes": len(book),
            "nonzero": int(len(positions)),
            "entries": int(len(offsets)), "index_bits": index_bits,
            **{name: {"coder": c, "bytes": len(d)} for name, (c, d) in coded.items()}}
    numel = max(1, w.size)
    streams = sum(len(d) for _, d in coded.values())
    bound = sum(entropy_bits(v) for v in raw.values())
    stats = {"numel": int(w.size), "nonzero": int(len(positions)), "clusters": k,
             "fillers": int(is_filler.sum()), "bytes": len(payload),
             "codebook_bytes": len(book),
             **{f"{name}_bytes": len(coded[name][1]) for name in STREAMS},
             "coders": [coded[name][0] for name in STREAMS],
             "bits_per_weight": 8 * len(payload) / numel,
             "stream_bits_per_weight": 8 * streams / numel,
             "entropy_bits_per_weight": bound / numel,
             "bits_per_nonzero": 8 * len(payload) / max(1, len(positions))}
    return payload, meta, stats


def decode_shared(payload: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_shared`.

    Raises:
        ValueError: sizes, symbols or positions that do not fit the metadata.
    """
    shape = [int(s) for s in meta["shape"]]
    numel = int(np.prod(shape)) if shape else 1
    if min(shape, default=0) < 0 or numel > MAX_NUMEL:
        raise ValueError(f"implausible shape {shape}")
    k, entries, span = int(meta["clusters"]), int(meta["entries"]), 1 << int(meta["index_bits"])
    sizes = [int(meta[name]["bytes"]) for name in STREAMS]
    book = int(meta["codebook_bytes"])
    if book + sum(sizes) != len(payload) or min(k, entries, book, *sizes) < 0:
        raise ValueError(f"payload has {len(payload)} bytes, the manifest accounts for "
                         f"{book + sum(sizes)}")
    codebook, end = read_codebook(payload[:book], k, meta["codebook"])
    if end != book:
        raise ValueError(f"codebook takes {end} bytes, the manifest says {book}")
    bounds = np.cumsum([book, *sizes]).tolist()
    data = {name: payload[lo:hi] for name, lo, hi in zip(STREAMS, bounds[:-1], bounds[1:],
                                                         strict=True)}
    offsets = decode_stream(data["positions"], meta["positions"]["coder"], entries)
    if offsets.size and offsets.max() >= span:
        raise ValueError("decoded offsets exceed the offset width")
    at_max = offsets == span - 1
    symbols = np.zeros(entries, dtype=np.int64)
    symbols[~at_max] = decode_stream(data["index"], meta["index"]["coder"],
                                     int((~at_max).sum()))
    symbols[at_max] = decode_stream(data["index_max"], meta["index_max"]["coder"],
                                    int(at_max.sum()))
    if (symbols > k).any() or (symbols[~at_max] == k).any():
        raise ValueError("decoded symbols lie outside the codebook")
    is_filler = symbols == k
    positions = from_relative(offsets, is_filler)
    if len(positions) != int(meta["nonzero"]) or (positions.size and positions[-1] >= numel):
        raise ValueError(f"decoded {len(positions)} positions (last "
                         f"{positions[-1] if positions.size else '-'}) for a tensor of "
                         f"{numel} with {meta['nonzero']} non-zeros")
    dense = np.zeros(numel, dtype=np.float32)
    dense[positions] = codebook[symbols[~is_filler]]
    return torch.from_numpy(dense).reshape(shape)


def encode_raw(tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    """The tensor's bytes as they are in memory (little-endian), with shape and dtype."""
    t = tensor.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return data, {"encoding": "raw", "shape": list(t.shape),
                  "dtype": str(t.dtype).removeprefix("torch.")}


def decode_raw(payload: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_raw`.

    Raises:
        ValueError: unknown dtype, or a payload size that does not fit shape and dtype.
    """
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{meta['dtype']}'")
    shape = [int(s) for s in meta["shape"]]
    numel = int(np.prod(shape)) if shape else 1
    item = torch.empty((), dtype=dtype).element_size()
    if len(payload) != numel * item:
        raise ValueError(f"{len(payload)} bytes do not hold {numel} {meta['dtype']} values")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
    return flat.reshape(shape).clone()


def decode_tensor(payload: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """Decode a payload by its ``meta["encoding"]`` (``shared`` or ``raw``).

    Raises:
        ValueError: unknown encoding or an inconsistent payload.
    """
    if meta.get("encoding") == "shared":
        return decode_shared(payload, meta)
    if meta.get("encoding") == "raw":
        return decode_raw(payload, meta)
    raise ValueError(f"unknown tensor encoding '{meta.get('encoding')}'")
