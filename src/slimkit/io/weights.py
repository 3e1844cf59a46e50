"""Weights as safetensors, with sparse tensors stored as a bitmask plus their non-zero values.

A pruned tensor of density d costs 32 bits per weight dense, but 1 + 32·d bits as a bitmask
and values, so the file on disk really shrinks; reading it back reproduces the tensor exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from slimkit.core.errors import ModelLoadError
from slimkit.core.files import write_bytes

SPARSE_MIN_NUMEL = 256


def _worth_sparse(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() < SPARSE_MIN_NUMEL:
        return False
    nnz = int(torch.count_nonzero(t))
    bits = t.element_size() * 8
    return t.numel() + bits * nnz < bits * t.numel() * 0.9


def encode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``state`` into safetensors entries and an encoding table (dense or bitmask)."""
    tensors: dict[str, torch.Tensor] = {}
    encoding: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        # Tied weights (an LM head sharing the embedding) are one tensor under two names:
        # stored once, the second name an alias of the first.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype, t.device)
        if t.numel() and key in seen:
            encoding[name] = {"format": "alias", "of": seen[key]}
            continue
        seen[key] = name
        t = t.detach().cpu().contiguous()
        if _worth_sparse(t):
            mask = (t != 0).flatten().numpy()
            tensors[f"{name}::mask"] = torch.from_numpy(np.packbits(mask))
            tensors[f"{name}::values"] = t.flatten()[torch.from_numpy(mask)].clone()
            encoding[name] = {"format": "bitmask", "shape": list(t.shape),
                              "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            tensors[name] = t
    return tensors, encoding


def _bitmask_parts(name: str, enc: Any, tensors: dict[str, torch.Tensor],
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Shape, packed mask and values of one sparse tensor, checked against each other.

    The shape comes from the file's metadata, so the element count it implies is compared
    with the bytes the mask really holds before anything of that size is allocated: a dense
    tensor can then be at most 8 elements per mask byte.
    """
    shape = enc.get("shape") if isinstance(enc, dict) else None
    if not isinstance(enc, dict) or enc.get("format") != "bitmask" or not isinstance(
            shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"sparse tensor '{name}' has a malformed encoding entry {enc!r:.80}")
    mask, values = tensors.get(f"{name}::mask"), tensors.get(f"{name}::values")
    if mask is None or values is None:
        raise ValueError(f"sparse tensor '{name}' lacks its mask or values")
    numel = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (numel + 7) // 8:
        raise ValueError(f"sparse tensor '{name}' claims shape {shape} ({numel} values) but "
                         f"its mask holds {mask.numel()} bytes of {mask.dtype}")
    if values.dim() != 1 or str(values.dtype).removeprefix("torch.") != enc.get("dtype"):
        raise ValueError(f"sparse tensor '{name}' has values of {values.dtype}, shape "
                         f"{list(values.shape)}; its entry says {enc.get('dtype')}")
    return shape, mask, values


def decode_state(tensors: dict[str, torch.Tensor], encoding: dict,
                 source: str = "weights") -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`.

    Raises:
        ModelLoadError: an encoding entry whose shape, mask and values disagree (naming
            ``source`` and the tensor), found before the dense tensor is allocated.
    """
    if not isinstance(encoding, dict):
        raise ModelLoadError(f"'{source}' has a malformed slimkit_encoding (not an object)")
    state = {k: v for k, v in tensors.items() if "::" not in k}
    aliases = {k: e for k, e in encoding.items() if isinstance(e, dict)
               and e.get("format") == "alias"}
    for name, enc in encoding.items():
        if name in aliases:
            continue
        try:
            shape, mask_bytes, values = _bitmask_parts(name, enc, tensors)
        except ValueError as exc:
            raise ModelLoadError(f"'{source}': {exc}; re-create the file") from None
        numel = math.prod(shape)
        mask = np.unpackbits(mask_bytes.numpy(), count=numel).astype(bool)
        if int(mask.sum()) != values.numel():
            raise ModelLoadError(f"'{source}': sparse tensor '{name}' has a mask and values "
                                 "that disagree")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[torch.from_numpy(mask)] = values
        state[name] = dense.reshape(shape)
    for name, enc in aliases.items():
        if enc.get("of") not in state or enc.get("of") in aliases:
            raise ModelLoadError(f"'{source}': tensor '{name}' is an alias of "
                                 f"'{enc.get('of')!s:.80}', which the file does not hold; "
                                 "re-create the file")
        state[name] = state[enc["of"]]
    return state


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` atomically as safetensors (sparse tensors as bitmask + values)."""
    tensors, encoding = encode_state(state)
    blob = st_save(tensors, metadata={"slimkit_encoding": json.dumps(encoding)})
    write_bytes(path, blob)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by :func:`save_weights` (or any plain safetensors file).

    Raises:
        ModelLoadError: the file is missing, truncated or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file '{path}' does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"'{path}' is not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from None
    try:
        encoding = json.loads((header.get("__metadata__") or {}).get("slimkit_encoding", "{}"))
    except (json.JSONDecodeError, AttributeError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"'{path}' has a malformed slimkit_encoding: {exc}") from None
    return decode_state(tensors, encoding, str(path))
