"""Judge a target against measurements: met or missed, and by how much."""

from __future__ import annotations

from typing import Any


def _criterion(name: str, asked: float, achieved: float | None, higher_is_better: bool,
               unit: str) -> dict[str, Any]:
    if achieved is None:
        return {"name": name, "asked": asked, "achieved": None, "met": False, "margin": None,
                "unit": unit, "note": "could not be measured"}
    margin = achieved - asked if higher_is_better else asked - achieved
    return {"name": name, "asked": asked, "achieved": achieved, "met": margin >= 0,
            "margin": margin, "unit": unit}


def check_target(target: Any, data: Any) -> None:
    """Refuse, before any work, a ``max_metric_drop`` naming a metric the data's task does not
    have, or one without data to measure it on.

    Raises:
        ConfigError: naming the metric and the task's metrics.
    """
    from slimkit.core.errors import ConfigError
    from slimkit.measure.tasks import get_task

    asked = getattr(target, "max_metric_drop", None) or {}
    if not asked:
        return
    if data is None:
        raise ConfigError("target.max_metric_drop needs data to measure the metric on "
                          "(give --data)")
    task = get_task(data.task)
    for name in asked:
        if name not in task.higher_is_better:
            raise ConfigError(f"target.max_metric_drop: task '{task.name}' has no metric "
                              f"'{name}'; its metrics are {', '.join(task.higher_is_better)}")


def judge(target: Any, baseline: dict, final: dict, comparison: dict,
          export_error: str | None = None, parity: dict | None = None,
          task: str | None = None) -> dict[str, Any]:
    """Compare the final model with the baseline on every criterion the target names.

    Args:
        target: a recipe ``Target``.
        baseline, final: measurements with ``accuracy`` and ``size_bytes``.
        comparison: latency ratios, ``{runtime: {batch: {"speedup"}}}``.
        export_error: why the final model could not be exported to ONNX, if it could not;
            the deliverable includes a runnable ONNX file, so that alone misses the target.
        parity: the final ONNX file against PyTorch (``check_parity``); an ONNX file that
            computes something else is no deliverable either, so a failed check is a failed
            criterion (``max_onnx_diff``) whatever the target.

    Returns:
        ``{"met": bool, "criteria": [...]}``; an empty target is met trivially, and says so.
    """
    criteria = []
    if target.max_accuracy_drop is not None:
        drop = None
        if baseline.get("accuracy") and final.get("accuracy"):
            drop = 100.0 * (baseline["accuracy"]["top1"] - final["accuracy"]["top1"])
        criteria.append(_criterion("max_accuracy_drop", target.max_accuracy_drop, drop,
                                   higher_is_better=False, unit="points"))
    for metric, asked in (getattr(target, "max_metric_drop", None) or {}).items():
        from slimkit.measure.tasks import get_task

        before = (baseline.get("metrics") or {}).get(metric)
        after = (final.get("metrics") or {}).get(metric)
        drop = (get_task(task).drop(metric, before, after)
                if before is not None and after is not None else None)
        criteria.append(_criterion(f"max_metric_drop ({metric})", asked, drop,
                                   higher_is_better=False, unit=""))
    if target.min_size_ratio is not None:
        criteria.append(_criterion("min_size_ratio", target.min_size_ratio,
                                   comparison.get("size_ratio"), True, "x"))
    if target.min_speedup is not None:
        t = target.min_speedup
        entry = comparison.get(t.runtime, {}).get(str(t.batch), {})
        criteria.append(_criterion(f"min_speedup ({t.runtime}, batch {t.batch})", t.value,
                                   entry.get("speedup"), True, "x"))
        if entry.get("speedup_ci95"):  # the measured speedup's 95% interval, for the reader
            criteria[-1]["ci95"] = entry["speedup_ci95"]
    note = None if criteria else "the recipe sets no target"
    if export_error is not None:
        criteria.append({"name": "onnx_export", "asked": "an ONNX file that runs in ONNX Runtime",
                         "achieved": None, "met": False, "margin": None, "unit": "",
                         "note": export_error})
    elif parity is not None and "atol" in parity:
        criteria.append(_criterion("max_onnx_diff", parity["atol"], parity.get("max_abs_diff"),
                                   higher_is_better=False, unit=""))
        criteria[-1]["met"] = bool(parity.get("ok")) and criteria[-1]["met"]
    return {"met": all(c["met"] for c in criteria), "criteria": criteria, "note": note}
