"""The one read of the test split, after the last stage.

Stages see the data without its test split (:mod:`slimkit.data.guard`) and the runner
measures each stage on the validation split, so no choice, of a stage or of the user reading
the per-stage figures, can have seen the test split. After the last stage the runner reads
it once: an in-memory split is read into batches once and every evaluation (the baseline's
and the final model's metrics, their output fidelity) runs over those same batches; a
stream's test source is iterated once per evaluation, in this same phase.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from slimkit.io import batch as B
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure import output_fidelity
from slimkit.measure.stats import accuracy_ci_of, mcnemar
from slimkit.measure.tasks import get_task

READ_ONCE = "test split read once, after the last stage"


def _replay(data: Any) -> tuple[Callable[[], Iterable], Callable[[], int], Callable[[], int]]:
    """A batches function over the test split, the sample count it saw, and how many times
    the split's source is read."""
    if data.streaming:  # held in memory it might not fit: read per evaluation
        seen, reads = [0], [0]

        def stream() -> Iterable:
            seen[0], reads[0] = 0, reads[0] + 1
            for x, y in data.batches("test"):
                seen[0] += len(y)
                yield x, y

        return stream, lambda: seen[0], lambda: reads[0]
    held = list(data.batches("test"))  # slices of tensors already in memory: no copy
    n = sum(len(y) for _, y in held)
    return lambda: iter(held), lambda: n, lambda: 1


def _metrics(model: SlimModel, data: Any, batches: Callable[[], Iterable], n: Callable[[], int],
             reference: Any) -> dict[str, Any]:
    with B.judging(model.output):
        metrics = get_task(data.task).evaluate(model.module, batches, reference)
    out: dict[str, Any] = {"metrics": metrics, "split": "test",
                           "accuracy": metrics if data.task == "classification" else None}
    if data.task == "classification":
        out["accuracy_ci95"] = accuracy_ci_of(metrics["top1"], n())
    return out


def _paired(baseline: SlimModel, final: SlimModel, batches: Callable[[], Iterable]
            ) -> dict[str, Any]:
    """Exact McNemar test of baseline against final on the same test samples: whether their
    top-1 accuracies differ beyond the noise (see :func:`slimkit.measure.stats.mcnemar`)."""
    hits = []
    for m in (baseline, final):
        set_mode(m.module, False)
        with B.judging(m.output), torch.inference_mode():
            hits.append(torch.cat([B.select(B.call(m.module, x)).argmax(1) == y
                                   for x, y in batches()]))
    return mcnemar(hits[0].numpy(), hits[1].numpy())


def final_test(baseline: SlimModel, final: SlimModel, data: Any) -> dict[str, Any]:
    """Evaluate ``baseline`` and ``final`` on the test split, read once (see the module).

    Returns:
        ``{"baseline": ..., "final": ...}`` (each ``metrics``, ``accuracy``,
        ``accuracy_ci95``, ``split``), ``fidelity`` of final against baseline, and
        ``record``: what report.json says of the test split (for in-memory classification
        data with ``baseline_vs_final``: whether the two top-1s differ beyond the noise).
    """
    batches, n, reads = _replay(data)
    base = _metrics(baseline, data, batches, n, None)
    fin = _metrics(final, data, batches, n, baseline.module)
    fidelity = output_fidelity(baseline.module, final.module,
                               lambda: (x for x, _ in batches()), baseline.output)
    record = {"policy": READ_ONCE, "samples": n(), "source_reads": reads(),
              "stages_saw_test": False, "stage_metrics_split": "val"}
    if data.task == "classification" and not data.streaming:  # replays the batches held
        record["baseline_vs_final"] = _paired(baseline, final, batches)
    return {"baseline": base, "final": fin, "fidelity": fidelity, "record": record}


def with_test(measured: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """``measured`` (on the validation split) with the test figures as its metrics, the
    validation ones kept as ``val_metrics`` / ``val_accuracy_ci95``."""
    out = dict(measured)
    out["val_metrics"] = measured.get("metrics")
    if "accuracy_ci95" in measured:
        out["val_accuracy_ci95"] = measured["accuracy_ci95"]
    out.update(test)
    return out
