"""Weights as safetensors, with sparse tensors stored as a bitmask plus their non-zero values.

A pruned tensor of density d costs 32 bits per weight dense, but 1 + 32·d bits as a bitmask
and values, so the file on disk really shrinks; reading it back reproduces the tensor exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    for name, t in state.items():
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


def decode_state(tensors: dict[str, torch.Tensor], encoding: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`."""
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for name, enc in encoding.items():
        shape = enc["shape"]
        numel = int(np.prod(shape)) if shape else 1
        mask = np.unpackbits(tensors[f"{name}::mask"].numpy(), count=numel).astype(bool)
        values = tensors[f"{name}::values"]
        if int(mask.sum()) != values.numel():
            raise ModelLoadError(f"sparse tensor '{name}' has a mask and values that disagree")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[torch.from_numpy(mask)] = values
        state[name] = dense.reshape(shape)
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
    encoding = json.loads(header.get("__metadata__", {}).get("slimkit_encoding", "{}"))
    return decode_state(tensors, encoding)
