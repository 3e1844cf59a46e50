"""Tasks: what a model is for, as named metrics with a direction and a training loss.

A task turns a model and batches into ``{metric: value}`` and says which way each metric is
better, so that a target ("at most 0.5 perplexity lost"), the verdict, fine-tuning and every
selection made on a validation split work for classifiers, regressors, sentence encoders and
language models alike:

- ``classification``: ``top1``/``top5`` (fractions) on integer labels; cross-entropy.
- ``regression``: ``mse``/``mae`` on float targets; mean squared error.
- ``causal_lm``: ``perplexity`` of next-token prediction on held-out text (padding masked by
  ``attention_mask``); the shifted cross-entropy. Needs no labels.
- ``embedding``: ``cosine`` to the uncompressed model's embedding and ``neighbour_top1``, the
  share of samples whose nearest neighbour in the set stays the same; needs the reference
  model and no labels. Embeddings are the judged output mean-pooled over the sequence
  (masked) when it has one.

A user's own ``evaluate(model, batches) -> {name: value}`` becomes a task with
:func:`custom_task`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError, DataError, ModelError
from slimkit.core.registry import Registry
from slimkit.io import batch as B
from slimkit.io.model import set_mode

Batches = Callable[[], Iterator[tuple[Any, torch.Tensor]]]


@dataclass(frozen=True)
class Task:
    """A task's metrics, their directions and its training loss.

    Attributes:
        name: the registry name.
        metrics: ``fn(model, batches, reference) -> {metric: value}``; ``batches()`` yields
            ``(inputs, labels)``; ``reference`` is the uncompressed model (or None).
        higher_is_better: per metric, its direction.
        primary: the metric early stopping and selections use.
        loss: ``fn(outputs, inputs, labels, reference_outputs) -> loss`` for fine-tuning;
            ``reference_outputs`` are the uncompressed model's (None when there is none).
        needs_labels: whether batches must carry labels.
        needs_reference: whether the metrics compare with the uncompressed model.
    """

    name: str
    metrics: Callable[[nn.Module, Batches, nn.Module | None], dict[str, float]]
    higher_is_better: dict[str, bool]
    primary: str
    loss: Callable[[Any, Any, torch.Tensor, Any], torch.Tensor] | None = None
    needs_labels: bool = True
    needs_reference: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, model: nn.Module, batches: Batches,
                 reference: nn.Module | None = None) -> dict[str, float]:
        """The task's metrics of ``model``; each must be a finite number.

        Raises:
            ModelError: a metric is NaN/Inf or not a number (naming it and the task).
        """
        if self.needs_reference and reference is None:
            reference = model
        with torch.inference_mode():
            set_mode(model, False)
            if reference is not None:
                set_mode(reference, False)
            try:
                out = self.metrics(model, batches, reference)
            except (ModelError, DataError):
                raise
            except Exception as exc:
                raise ModelError(f"task '{self.name}': the metric function failed "
                                 f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
                                 ) from None
        if not isinstance(out, dict) or not out:
            raise ModelError(f"task '{self.name}': the metric function must return a "
                             f"non-empty {{name: value}} dict, got {type(out).__name__}")
        for key, value in out.items():
            if not isinstance(value, int | float) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise ModelError(f"task '{self.name}': metric '{key}' is {value!r}, not a "
                                 "finite number")
        return {k: float(v) for k, v in out.items()}

    def drop(self, metric: str, baseline: float, final: float) -> float:
        """How much worse ``final`` is than ``baseline`` on ``metric`` (negative: better)."""
        if metric not in self.higher_is_better:
            raise ConfigError(f"task '{self.name}' has no metric '{metric}'; its metrics are "
                              f"{', '.join(self.higher_is_better)}")
        return baseline - final if self.higher_is_better[metric] else final - baseline


TASKS: Registry[Task] = Registry("task")


def _outputs(model: nn.Module, x: Any) -> torch.Tensor:
    return B.select(B.call(model, x)).float()


def _classification(model: nn.Module, batches: Batches, _ref: Any) -> dict[str, float]:
    hits1 = hits5 = n = 0
    for x, y in batches():
        logits = _outputs(model, x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y.view(-1, 1)
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(1).sum())
        n += len(y)
    if n == 0:
        raise DataError("classification: the evaluation data holds no sample")
    return {"top1": hits1 / n, "top5": hits5 / n}


def _regression(model: nn.Module, batches: Batches, _ref: Any) -> dict[str, float]:
    se = ae = 0.0
    n = 0
    for x, y in batches():
        pred = _outputs(model, x).double().reshape(y.shape)
        err = pred - y.double()
        se += float((err ** 2).sum())
        ae += float(err.abs().sum())
        n += err.numel()
    if n == 0:
        raise DataError("regression: the evaluation data holds no sample")
    return {"mse": se / n, "mae": ae / n}


def _lm_parts(logits: torch.Tensor, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-likelihood terms: (per-token cross-entropy, weights from the mask)."""
    ids = x["input_ids"] if isinstance(x, dict) else B.leaves(x)[0]
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ModelError(f"causal_lm: the judged output must be logits [batch, sequence, "
                         f"vocabulary] matching input_ids {tuple(ids.shape)}, got "
                         f"{tuple(logits.shape)} (set output: logits)")
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                         ids[:, 1:].reshape(-1), reduction="none")
    w = (mask[:, 1:].reshape(-1).to(ce.dtype) if mask is not None else torch.ones_like(ce))
    return ce, w


def _causal_lm(model: nn.Module, batches: Batches, _ref: Any) -> dict[str, float]:
    total = weight = 0.0
    for x, _y in batches():
        ce, w = _lm_parts(_outputs(model, x), x)
        total += float((ce.double() * w).sum())
        weight += float(w.sum())
    if weight == 0:
        raise DataError("causal_lm: the evaluation text holds no next token to predict")
    return {"perplexity": math.exp(total / weight), "loss": total / weight}


def _lm_loss(out: Any, x: Any, _y: torch.Tensor, _ref: Any) -> torch.Tensor:
    ce, w = _lm_parts(B.select(out), x)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def embed(out: Any, x: Any) -> torch.Tensor:
    """The sample embeddings in the judged output: ``[batch, dim]`` as it is, a sequence
    ``[batch, tokens, dim]`` mean-pooled over the tokens ``attention_mask`` keeps."""
    h = B.select(out).float()
    if h.dim() == 2:
        return h
    if h.dim() != 3:
        raise ModelError(f"embedding: the judged output has shape {tuple(h.shape)}; expected "
                         "[batch, dim] or [batch, tokens, dim]")
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _embedding(model: nn.Module, batches: Batches, reference: nn.Module) -> dict[str, float]:
    mine, theirs = [], []
    for x, _y in batches():
        mine.append(embed(B.call(model, x), x).double())
        theirs.append(embed(B.call(reference, x), x).double())
    if not mine:
        raise DataError("embedding: the evaluation data holds no sample")
    a, b = F.normalize(torch.cat(mine), dim=1), F.normalize(torch.cat(theirs), dim=1)
    cosine = float((a * b).sum(1).mean())
    if len(a) < 2:
        return {"cosine": cosine}
    # Nearest neighbour of every sample among the others, by each model's embeddings.
    sim_a, sim_b = a @ a.T, b @ b.T
    sim_a.fill_diagonal_(-2.0)
    sim_b.fill_diagonal_(-2.0)
    same = (sim_a.argmax(1) == sim_b.argmax(1)).double().mean()
    return {"cosine": cosine, "neighbour_top1": float(same)}


def _embedding_loss(out: Any, x: Any, _y: torch.Tensor, ref: Any) -> torch.Tensor:
    """1 - cosine to the uncompressed model's embedding: an encoder has no labels, so it is
    fine-tuned to give back what it gave before compression."""
    if ref is None:
        raise ConfigError("embedding: fine-tuning an encoder needs its uncompressed model as "
                          "the reference (the stage's teacher)")
    return 1 - F.cosine_similarity(embed(out, x), embed(ref, x).detach(), dim=1).mean()


TASKS.register("classification", Task(
    "classification", _classification, {"top1": True, "top5": True}, "top1",
    loss=lambda out, _x, y, _r: F.cross_entropy(B.select(out), y)))
TASKS.register("regression", Task(
    "regression", _regression, {"mse": False, "mae": False}, "mse",
    loss=lambda out, _x, y, _r: F.mse_loss(B.select(out).reshape(y.shape),
                                          y.to(B.select(out).dtype))))
TASKS.register("causal_lm", Task(
    "causal_lm", _causal_lm, {"perplexity": False, "loss": False}, "perplexity",
    loss=_lm_loss, needs_labels=False))
TASKS.register("embedding", Task(
    "embedding", _embedding, {"cosine": True, "neighbour_top1": True}, "cosine",
    loss=_embedding_loss, needs_labels=False, needs_reference=True))


def custom_task(evaluate: Callable[[nn.Module, Any], dict[str, float]],
                higher_is_better: dict[str, bool], name: str = "custom") -> Task:
    """A task from a user's ``evaluate(model, batches) -> {name: value}``.

    ``batches`` is an iterable of ``(inputs, labels)``; ``higher_is_better`` gives every
    metric's direction, the first one is primary.

    Example:
        >>> task = custom_task(my_eval, {"f1": True})  # doctest: +SKIP
    """
    if not higher_is_better:
        raise ConfigError("custom_task: higher_is_better must name at least one metric")

    def metrics(model: nn.Module, batches: Batches, _ref: Any) -> dict[str, float]:
        out = evaluate(model, batches())
        missing = [k for k in higher_is_better if not isinstance(out, dict) or k not in out]
        if missing:
            raise ModelError(f"task '{name}': evaluate returned no metric '{missing[0]}'")
        return out

    return Task(name, metrics, dict(higher_is_better), next(iter(higher_is_better)))


def get_task(task: str | Task | None) -> Task:
    """A task by name (``classification`` when None), or the task itself."""
    if isinstance(task, Task):
        return task
    return TASKS.get(task or "classification")


def data_batches(x: Any, y: torch.Tensor | None, batch_size: int = 256) -> Batches:
    """``(inputs, labels)`` batches over in-memory inputs, as a re-iterable."""

    def gen() -> Iterator[tuple[Any, torch.Tensor]]:
        n = B.size(x)
        for i in range(0, n, batch_size):
            s = slice(i, i + batch_size)
            yield B.take(x, s), (y[s] if y is not None else torch.zeros(0))

    return gen
