"""Forward passes over calibration batches with hooks attached: how statistics are gathered.

Quantization observers, GPTQ Hessians, SmoothQuant ranges, bias correction and low-rank
calibration all watch layer inputs/outputs while the model runs on a few batches; this is the
one runner they share. It never changes the model: hooks are removed and every module's own
train/eval flag restored, also when a batch fails.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from slimkit.core.progress import step
from slimkit.io import batch as B
from slimkit.io.model import modes_kept, set_mode


def hooked_passes(model: nn.Module, handles: list, batches: Iterable[tuple[torch.Tensor, ...]],
                  ) -> None:
    """Run ``batches`` through ``model`` in eval + inference mode with hooks already attached.

    Args:
        model: the model; its modes are restored afterwards.
        handles: the hook handles to remove when done.
        batches: model inputs as :func:`slimkit.io.batch.call` takes them.
    """
    try:
        with modes_kept(model), torch.inference_mode():
            set_mode(model, False)
            with step("calibration", total=_len(batches), unit="batches") as shown:
                for batch in batches:
                    B.call(model, batch)
                    shown.advance()
    finally:
        for h in handles:
            h.remove()


def _len(batches: Iterable) -> int | None:
    return len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
