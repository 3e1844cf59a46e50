"""Peak inference memory, measured by tracking every tensor storage a forward pass allocates."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from slimkit.io import batch as B
from slimkit.io.model import set_mode


class _LiveBytes(TorchDispatchMode):
    """Counts bytes of storages created by ops while they are alive, and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_memory(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Peak bytes held during one inference: weights plus the largest set of live activations.

    Returns:
        ``{"weights_bytes", "activations_peak_bytes", "peak_memory_bytes"}``.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    set_mode(model, False)
    tracker = _LiveBytes()
    with torch.inference_mode(), tracker:
        out = B.call(model, example_inputs)
    del out
    return {
        "weights_bytes": weights,
        "activations_peak_bytes": tracker.peak,
        "peak_memory_bytes": weights + tracker.peak,
    }
