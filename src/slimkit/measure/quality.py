"""Accuracy of a classifier and output fidelity between two models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimkit.io import batch as B
from slimkit.io.model import set_mode


def predict(model: Callable[..., Any], x: Any, batch_size: int = 256,
            output: str | None = None) -> torch.Tensor:
    """The judged output (see :func:`slimkit.io.batch.select`) of ``model`` (a module or any
    callable) over the inputs ``x`` (a tensor, tuple or dict batch), batched."""
    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        set_mode(model, False)
        device = next(model.parameters(), torch.empty(0)).device
    outs = []
    with torch.inference_mode():
        for i in range(0, B.size(x), batch_size):
            xb = B.to(B.take(x, slice(i, i + batch_size)), device)
            outs.append(torch.as_tensor(B.select(B.call(model, xb), output)).float().cpu())
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy as fractions in [0, 1] (top-5 is top-k for k = min(5, classes))."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit = topk == y.view(-1, 1)
    return {"top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(1).float().mean())}


def fidelity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How closely ``other`` reproduces ``reference``: mean cosine, max |diff|, top-1 agreement."""
    a = reference.reshape(len(reference), -1).double()
    b = other.reshape(len(other), -1).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return {
        "cosine": float(cos.mean()),
        "max_abs_diff": float((a - b).abs().max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
    }
