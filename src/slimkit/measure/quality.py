"""Accuracy of a classifier and output fidelity between two models."""

from __future__ import annotations

import math
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


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``other`` against ``reference``, in dB (float64)."""
    ref, err = reference.double(), other.double() - reference.double()
    noise = float(err.pow(2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(max(float(ref.pow(2).sum()),
                                                                 1e-300) / noise)


def output_fidelity(reference: Callable[..., Any], other: Callable[..., Any], x: Any,
                    output: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """How closely ``other`` reproduces ``reference`` on inputs ``x`` (a batch, or a function
    returning an iterable of batches: a stream), on every output.

    The judged output (``output``, else the first) gives the top-level figures of
    :func:`fidelity`; ``per_output`` holds each output's cosine, SQNR (dB) and max |diff|,
    so that a quantized encoder's hidden states are judged, not only its logits.
    """
    refs: dict[str, list[torch.Tensor]] = {}
    outs: dict[str, list[torch.Tensor]] = {}
    chunks = x if callable(x) else (
        lambda: (B.take(x, slice(i, i + batch_size)) for i in range(0, B.size(x), batch_size)))
    for m, store in ((reference, refs), (other, outs)):
        if isinstance(m, torch.nn.Module):
            set_mode(m, False)
        with torch.inference_mode():
            for xb in chunks():
                for k, v in B.flatten(B.call(m, xb)).items():
                    store.setdefault(k, []).append(v.float().cpu())
    per_output = {}
    for k, parts in refs.items():
        a = torch.cat(parts)
        b = torch.cat(outs[k]) if k in outs else None
        if b is None or b.shape != a.shape:
            per_output[k] = {"error": "missing or reshaped in the compressed model"}
            continue
        flat_a, flat_b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
        per_output[k] = {"cosine": float(torch.nn.functional.cosine_similarity(
                             flat_a, flat_b, dim=1, eps=1e-12).mean()),
                         "sqnr_db": sqnr_db(a, b), "max_abs_diff": float((a - b).abs().max())}
    key = output if output in refs else next(iter(refs))
    judged = fidelity(torch.cat(refs[key]), torch.cat(outs[key]))
    return {**judged, "output": key, "per_output": per_output}
