"""Lossless coding of one tensor: shared weights (codebook + coded streams) or raw bytes.

A weight tensor whose non-zero values take few distinct values is stored as::

    codebook   the K distinct non-zero values, ascending (float32, or float16 when every
               value is exactly a float16), as varint gaps between order-preserving keys
    positions  the relative position offsets with fillers (see sparse.py)
    index      one symbol per stored entry whose offset is below the largest: the value's
               rank in the codebook
    index_max  the same for entries at the largest offset: a rank, or K for a filler

each stream entropy coded on its own (see streams.py). When it is smaller (``positions_mode``
``mask``), the positions are instead the keep-mask coded under an adaptive per-column model
(maskcode.py), and ``index`` holds the ranks of the non-zeros in order (no fillers).

Decoding reproduces the tensor bit for bit (same float32 values at the same positions, +0.0
elsewhere). Every other tensor (biases, BatchNorm statistics, integer buffers) is stored raw,
in its own dtype, little-endian, so it too comes back exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from slimkit.encode.config import Coder
from slimkit.encode.maskcode import decode_mask, encode_mask, mask_bound
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
MAX_INDEX_BITS = 16  # EncodeConfig writes at most 12


def checked_shape(shape: Any) -> tuple[list[int], int]:
    """A shape from a file's metadata and its element count, in exact integer arithmetic
    (numpy's int64 product wraps around for crafted shapes).

    Raises:
        ValueError: a negative size, or more than :data:`MAX_NUMEL` elements.
    """
    dims = [int(s) for s in shape]
    numel = math.prod(dims)
    if min(dims, default=0) < 0 or numel > MAX_NUMEL:
        raise ValueError(f"implausible shape {dims}")
    return dims, numel


def encode_shared(weight: torch.Tensor, index_bits: int, coder: Coder = "auto",
                  codebook_dtype: str = "float32", positions_mode: str = "auto",
                  ) -> tuple[bytes, dict[str, Any], dict]:
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
        positions_mode: ``offsets`` (relative offsets with fillers, the paper's), ``mask``
            (the keep-mask under an adaptive per-column model, see maskcode.py), or ``auto``
            (whichever is smaller for this tensor).

    Returns:
        ``(payload, meta, stats)``: the bytes; what the decoder needs (JSON); sizes, bits per
        weight and the empirical entropy bound of the coded streams.
    """
    w = weight.detach().cpu().contiguous().view(-1).numpy().astype(np.float32, copy=False)
    positions = np.flatnonzero(w)
    values = w[positions]
    codebook = np.unique(values)
    k = len(codebook)
    ranks = np.searchsorted(codebook, values)
    offsets, is_filler = to_relative(positions, index_bits)
    symbols = np.full(len(offsets), k, dtype=np.int64)
    symbols[~is_filler] = ranks
    at_max = offsets == (1 << index_bits) - 1
    book_dtype, book = write_codebook(codebook, codebook_dtype)
    raw = {"positions": offsets, "index": symbols[~at_max], "index_max": symbols[at_max]}
    coded = {name: encode_stream(raw[name], coder) for name in STREAMS}
    mode, extra = "offsets", {}
    if len(positions) and (positions_mode == "mask" or (positions_mode == "auto"
                                                       and coder != "huffman")):
        mask_bytes, extra = encode_mask(w != 0, list(weight.shape))
        index = encode_stream(ranks, coder)
        if positions_mode == "mask" or len(mask_bytes) + len(index[1]) < sum(
                len(d) for _, d in coded.values()):
            mode = "mask"
            coded = {"positions": ("ans", mask_bytes), "index": index,
                     "index_max": ("none", b"")}
            raw = {"positions": None, "index": ranks, "index_max": ranks[:0]}
            offsets, is_filler = positions, np.zeros(len(positions), dtype=bool)
    payload = book + b"".join(coded[name][1] for name in STREAMS)
    meta = {"encoding": "shared", "shape": list(weight.shape), "clusters": k,
            "positions_mode": mode, **({"mask_model": extra} if mode == "mask" else {}),
            "codebook": book_dtype, "codebook_bytes": len(book),
            "nonzero": int(len(positions)),
            "entries": int(len(offsets)), "index_bits": index_bits,
            **{name: {"coder": c, "bytes": len(d)} for name, (c, d) in coded.items()}}
    numel = max(1, w.size)
    streams = sum(len(d) for _, d in coded.values())
    bound = sum(entropy_bits(v) for v in raw.values() if v is not None)
    if mode == "mask":  # the positions' bound is the model's ideal code length
        bound += mask_bound(w != 0, list(weight.shape), extra)
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
    shape, numel = checked_shape(meta["shape"])
    k, entries, nonzero = int(meta["clusters"]), int(meta["entries"]), int(meta["nonzero"])
    index_bits = int(meta["index_bits"])
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits {index_bits} is outside [1, {MAX_INDEX_BITS}]")
    span = 1 << index_bits
    sizes = [int(meta[name]["bytes"]) for name in STREAMS]
    book = int(meta["codebook_bytes"])
    if book + sum(sizes) != len(payload) or min(k, entries, book, *sizes) < 0:
        raise ValueError(f"payload has {len(payload)} bytes, the manifest accounts for "
                         f"{book + sum(sizes)}")
    # Every count sizes an allocation below; each is bounded by the element count (itself
    # bounded by the architecture's tensor) before anything of that size exists.
    mask_mode = meta.get("positions_mode", "offsets") == "mask"
    if not (k <= nonzero <= numel and (mask_mode or nonzero <= entries <= numel)
            and (k > 0) == (nonzero > 0)):
        raise ValueError(f"counts do not fit a tensor of {numel}: {nonzero} non-zeros, "
                         f"{entries} entries, {k} clusters")
    codebook, end = read_codebook(payload[:book], k, meta["codebook"])
    if end != book:
        raise ValueError(f"codebook takes {end} bytes, the manifest says {book}")
    bounds = np.cumsum([book, *sizes]).tolist()
    data = {name: payload[lo:hi] for name, lo, hi in zip(STREAMS, bounds[:-1], bounds[1:],
                                                         strict=True)}
    if meta.get("positions_mode", "offsets") == "mask":
        positions, ranks = _decode_mask_streams(data, meta, numel, k)
    else:
        positions, ranks = _decode_offset_streams(data, meta, entries, span, k)
    if len(positions) != int(meta["nonzero"]) or (positions.size and positions[-1] >= numel):
        raise ValueError(f"decoded {len(positions)} positions (last "
                         f"{positions[-1] if positions.size else '-'}) for a tensor of "
                         f"{numel} with {meta['nonzero']} non-zeros")
    dense = np.zeros(numel, dtype=np.float32)
    dense[positions] = codebook[ranks]
    return torch.from_numpy(dense).reshape(shape)


def _decode_offset_streams(data: dict[str, bytes], meta: dict[str, Any], entries: int,
                           span: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and codebook ranks from the relative-offset streams (with fillers)."""
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
    return from_relative(offsets, is_filler), symbols[~is_filler]


def _decode_mask_streams(data: dict[str, bytes], meta: dict[str, Any], numel: int,
                         k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and codebook ranks from the coded keep-mask and the index stream."""
    nonzero = int(meta["nonzero"])
    if data["index_max"] or meta["positions"]["coder"] != "ans":
        raise ValueError("a mask-coded tensor has an ANS mask and no index_max stream")
    mask = decode_mask(data["positions"], [int(s) for s in meta["shape"]], nonzero,
                       meta["mask_model"])
    ranks = decode_stream(data["index"], meta["index"]["coder"], nonzero)
    if ranks.size and ranks.max() >= k:
        raise ValueError("decoded symbols lie outside the codebook")
    return np.flatnonzero(mask), ranks


def encode_raw(tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    """The tensor's bytes (little-endian), with shape and dtype.

    A float32 tensor whose every value is exactly a float16 (biases rounded on purpose) is
    stored as float16 (``"stored": "float16"``): half the bytes, and still bit-exact, because
    float16 -> float32 is exact.
    """
    t = tensor.detach().cpu().contiguous()
    meta: dict[str, Any] = {"encoding": "raw", "shape": list(t.shape),
                            "dtype": str(t.dtype).removeprefix("torch.")}
    if t.dtype == torch.float32 and t.numel() and torch.equal(t.half().float(), t):
        t = t.half()
        meta["stored"] = "float16"
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return data, meta


def decode_raw(payload: bytes, meta: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_raw`.

    Raises:
        ValueError: unknown dtype, or a payload size that does not fit shape and dtype.
    """
    dtype = getattr(torch, str(meta["dtype"]), None)
    stored = getattr(torch, str(meta.get("stored", meta["dtype"])), None)
    if not isinstance(dtype, torch.dtype) or not isinstance(stored, torch.dtype):
        raise ValueError(f"unknown dtype '{meta['dtype']}' / '{meta.get('stored')}'")
    shape, numel = checked_shape(meta["shape"])
    item = torch.empty((), dtype=stored).element_size()
    if len(payload) != numel * item:
        raise ValueError(f"{len(payload)} bytes do not hold {numel} {stored} values")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(stored)
    return flat.reshape(shape).to(dtype).clone()


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
