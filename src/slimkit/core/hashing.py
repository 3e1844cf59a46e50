"""Content hashes of tensors and state dicts (any dtype, bf16 included)."""

from __future__ import annotations

import hashlib

import torch


def update_with_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes into a hash."""
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def update_with_state(h: hashlib._Hash, state: dict[str, torch.Tensor]) -> None:
    for name, t in sorted(state.items()):
        h.update(name.encode())
        update_with_tensor(h, t)
