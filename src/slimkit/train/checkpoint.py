"""Resumable training checkpoints: everything needed to continue bit for bit.

A checkpoint holds model, objective, optimizer and scheduler state, the RNG states and the
position in the data, plus a fingerprint of the run; it is slimkit's own file, written
atomically and read back with ``torch.load(weights_only=True)`` (tensors and plain data only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from slimkit.core.errors import ModelLoadError, ResumeError
from slimkit.core.files import atomic_path
from slimkit.core.hashing import update_with_state, update_with_tensor
from slimkit.io import batch as B

CHECKPOINT = "train-checkpoint.pt"


def run_fingerprint(model: torch.nn.Module, data: tuple,
                    config: dict[str, Any], objective: str) -> str:
    """Hash of the starting weights, the training data, the config (minus checkpointing), a
    description of the objective (its kind and settings) and the intra-op thread count.

    The thread count is part of the run because it changes the results: CPU kernels split
    their reductions by thread, so float sums come out in another order.
    """
    h = hashlib.sha256()
    update_with_state(h, model.state_dict())
    for item in data:
        if isinstance(item, str):  # a stream's own fingerprint
            h.update(item.encode())
    for t in B.leaves(tuple(data)):
        update_with_tensor(h, t)
    cfg = {k: v for k, v in config.items() if k != "checkpoint_every"}
    h.update(json.dumps([cfg, objective, {"threads": torch.get_num_threads()}],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if any; refuses one written by a different run."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"training checkpoint '{path}' is unreadable: {exc}") from None
    if state.get("fingerprint") != fingerprint:
        raise ResumeError(f"training checkpoint '{path}' belongs to another run (different "
                          "model, data, config or thread count); refusing to resume. Delete it "
                          "to start over")
    return state
