"""The data of the report's tables: baseline vs final, one row per pipeline stage, and one row
per layer, as their templates (``templates/<table>.html.j2``) render them.

Missing values render as an em dash; a row is kept even when both sides are missing
for the metrics every report should have, so that a reader sees what was not measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from slimkit.report.fmt import (
    DASH,
    RUNTIME_NAMES,
    Cell,
    as_list,
    as_mapping,
    batch_sort_key,
    by_batch,
    dig,
    finite,
    fmt_bits,
    fmt_bytes,
    fmt_bytes_full,
    fmt_int,
    fmt_json,
    fmt_ms,
    fmt_pct,
    fmt_seconds,
    fmt_value,
    quality,
    speed_change,
)
from slimkit.report.layers import layer_pairs

#: (label, key, formatter, ratio key in ``comparison``, always shown)
_COUNT_ROWS: tuple[tuple[str, str, Callable[[Any], str], str | None, bool], ...] = (
    ("Parameters", "params", fmt_int, None, True),
    ("Non-zero parameters", "nonzero_params", fmt_int, None, True),
    ("Bits per parameter", "bits_per_param", fmt_bits, None, False),
    ("Size on disk", "size_bytes", fmt_bytes_full, "size_ratio", True),
    ("ONNX size", "onnx_size_bytes", fmt_bytes_full, "onnx_size_ratio", True),
    ("MACs", "macs", fmt_int, None, True),
    ("FLOPs", "flops", fmt_int, None, False),
    ("Peak memory", "peak_memory_bytes", fmt_bytes_full, None, False),
)

#: How many items of a stage's "changed"/"skipped" lists show before the rest fold away.
LIST_LIMIT = 6


def _ratio_cell(base: Any, final: Any, better: str, worse: str, ratio: Any = None) -> Cell:
    """``base / final`` as ``3.90× smaller`` (green) or ``1.20× larger`` (red)."""
    value = finite(ratio)
    if value is None:
        b, f = finite(base), finite(final)
        value = b / f if b is not None and f else None
    if value is None or value <= 0:
        return Cell(DASH, "na")
    if abs(value - 1) < 5e-3:
        return Cell("unchanged", "na")
    if value > 1:
        return Cell(f"{value:.2f}× {better}", "good")
    return Cell(f"{1 / value:.2f}× {worse}", "worse")


def _speed_cell(entry: Any, base_ms: Any, final_ms: Any) -> Cell:
    """The speedup of a comparison entry with its 95% interval (``no change`` when it
    holds 1); from the two medians when the report has no entry."""
    speedup = finite(dig(entry, "speedup"))
    if speedup is None:
        b, f = finite(base_ms), finite(final_ms)
        speedup = b / f if b is not None and f else None
    return Cell(*speed_change(speedup, dig(entry, "speedup_ci95")))


def _delta_cell(base: Any, final: Any) -> Cell:
    """An accuracy change in percentage points."""
    b, f = finite(base), finite(final)
    if b is None or f is None:
        return Cell(DASH, "na")
    delta = (f - b) * 100
    tone = "na" if abs(delta) < 5e-3 else "good" if delta > 0 else "worse"
    return Cell(f"{delta:+.2f} pts", tone)


def _row(label: str, base: str, final: str, change: Cell, cls: str = "") -> dict[str, Any]:
    return {"label": label, "base": base, "final": final, "change": change, "cls": cls}


def _latency_axes(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Runtimes and batch sizes to show: whatever was measured, else the usual ones."""
    runtimes: list[str] = []
    batches: list[str] = [str(b) for b in as_list(dig(report, "comparison", "batch_sizes"))]
    for side in ("baseline", "final"):
        for runtime, per_batch in as_mapping(dig(report, side, "latency")).items():
            runtimes += [str(runtime)] if str(runtime) not in runtimes else []
            batches += [str(b) for b in as_mapping(per_batch) if str(b) not in batches]
    for runtime, value in as_mapping(report.get("comparison")).items():
        if isinstance(value, Mapping) and str(runtime) not in runtimes:
            runtimes.append(str(runtime))
    preferred = ["torch", "onnxruntime"]  # always shown, so an unmeasured one reads as a dash
    runtimes = preferred + [r for r in runtimes if r not in preferred]
    batches = sorted(dict.fromkeys(batches), key=batch_sort_key) or ["1"]
    return runtimes, batches


def _latency_groups(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per runtime, its display name and a median and a p90 row per batch size."""
    runtimes, batches = _latency_axes(report)
    groups = []
    for runtime in runtimes:
        rows = []
        for batch in batches:
            base = by_batch(dig(report, "baseline", "latency", runtime), batch)
            final = by_batch(dig(report, "final", "latency", runtime), batch)
            entry = by_batch(dig(report, "comparison", runtime), batch)
            for stat, label in (("median_ms", "median"), ("p90_ms", "p90")):
                b, f = dig(base, stat), dig(final, stat)
                # The change is the median of paired per-round ratios, with its interval; a
                # ratio of two p90s has none, so the p90 row shows the times only.
                change = _speed_cell(entry, b, f) if stat == "median_ms" else Cell("", "na")
                rows.append(_row(f"batch {batch}, {label}", fmt_ms(b), fmt_ms(f), change, "sub"))
        groups.append({"runtime": RUNTIME_NAMES.get(runtime, runtime), "rows": rows})
    return groups


def _quality_rows(base: Mapping[str, Any], final: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-1 and top-5 accuracy, or another task's metrics (perplexity, cosine, MSE...) in
    their own units."""
    if base.get("accuracy") is not None or final.get("accuracy") is not None or not (
            base.get("metrics") or final.get("metrics")):
        pairs = [(label, dig(base, "accuracy", key), dig(final, "accuracy", key))
                 for label, key in (("Top-1 accuracy", "top1"), ("Top-5 accuracy", "top5"))]
        return [_row(label, fmt_pct(b), fmt_pct(f), _delta_cell(b, f)) for label, b, f in pairs]
    rows = []
    metrics = {**as_mapping(base.get("metrics")), **as_mapping(final.get("metrics"))}
    for key in metrics:
        b, f = finite(dig(base, "metrics", key)), finite(dig(final, "metrics", key))
        change = Cell(f"{f - b:+.4g}") if b is not None and f is not None else Cell(DASH, "na")
        rows.append(_row(key.replace("_", " ").capitalize(), fmt_value(b), fmt_value(f), change))
    return rows


def before_after(report: Mapping[str, Any]) -> dict[str, Any]:
    """Baseline vs final: counts, sizes, accuracy and latency, with the ratio of each."""
    base = as_mapping(report.get("baseline"))
    final = as_mapping(report.get("final"))
    comparison = as_mapping(report.get("comparison"))
    rows = []
    for label, key, fmt, ratio_key, always in _COUNT_ROWS:
        if not always and base.get(key) is None and final.get(key) is None:
            continue
        ratio = comparison.get(ratio_key) if ratio_key else None
        change = _ratio_cell(base.get(key), final.get(key), "smaller", "larger", ratio)
        rows.append(_row(label, fmt(base.get(key)), fmt(final.get(key)), change))
    return {"rows": rows + _quality_rows(base, final), "latency": _latency_groups(report)}


def _skip_item(item: Any) -> str | dict[str, str | None]:
    """``{what, why}`` for a skipped entry (a dict), or the entry itself as text."""
    if isinstance(item, Mapping) and ("what" in item or "why" in item):
        why = item.get("why")
        return {"what": fmt_value(item.get("what")),
                "why": fmt_value(why) if why is not None else None}
    return fmt_value(item)


def _measure_cells(measure: Any, baseline: Any) -> dict[str, Any]:
    """The stage's quality (top-1, or the task's primary metric) and its change from the
    baseline, then its size and non-zero parameters."""
    found, base = quality(measure), quality(baseline) if baseline is not None else None
    shown = note = None
    if found is not None:
        label, value = found
        top1 = label.startswith("top-1")
        if base is not None and base[0] == label:
            note = f"{value - base[1]:+.2f} pts" if top1 else f"{value - base[1]:+.4g}"
        shown = fmt_pct(value / 100) if top1 else f"{value:.4g}"
    return {"quality": shown, "note": note, "size": fmt_bytes(dig(measure, "size_bytes")),
            "nonzero": fmt_int(dig(measure, "nonzero_params"))}


def _stage_speed(stage: Mapping[str, Any], runtime: str) -> list[Cell]:
    """The stage's latency change in ``runtime`` from the model it started from, per batch
    with its 95% interval (timed interleaved)."""
    per_batch = as_mapping(dig(stage, "latency_change", runtime))
    lines = []
    for batch in sorted(per_batch, key=batch_sort_key):
        ratio = finite(dig(per_batch[batch], "time_ratio"))  # new time / old time
        ci = [finite(x) for x in as_list(dig(per_batch[batch], "ci95"))]
        speedup_ci = [1 / ci[1], 1 / ci[0]] if len(ci) == 2 and all(ci) else None
        text, tone = speed_change(1 / ratio if ratio else None, speedup_ci)
        lines.append(Cell(f"batch {batch}: {text}", tone))
    return lines


def _stage_row(position: int, stage: Any, baseline: Any, runtime: str) -> dict[str, Any]:
    """One stage: what it changed and skipped, its measure, its speed change and its flags
    (a stage that made the runtime slower, and the layers whose time grew)."""
    stage = as_mapping(stage)
    details = stage.get("details")
    return {
        "index": fmt_value(stage.get("index", position)),
        "kind": fmt_value(stage.get("kind", "stage")),
        "details": fmt_json(details) if details else None,
        "changed": [fmt_value(v) for v in as_list(stage.get("changed"))],
        "skipped": [_skip_item(v) for v in as_list(stage.get("skipped"))],
        "measure": _measure_cells(stage.get("measure"), baseline),
        "speed": _stage_speed(stage, runtime),
        "flags": [fmt_value(flag) for flag in as_list(stage.get("flags"))],
        "seconds": fmt_seconds(stage.get("seconds")),
    }


def stages(report: Mapping[str, Any]) -> dict[str, Any]:
    """One row per stage, framed by the baseline and the final model for reference."""
    items = as_list(report.get("stages"))
    baseline = report.get("baseline")
    seconds = [finite(dig(s, "seconds")) for s in items]
    total = (
        sum(s for s in seconds if s is not None) if any(s is not None for s in seconds) else None
    )
    runtime = str(dig(report, "target", "min_speedup", "runtime") or "onnxruntime")
    found = quality(baseline)
    return {
        "quality": "Top-1" if found is None or found[0].startswith("top-1")
        else found[0].capitalize(),
        "runtime": RUNTIME_NAMES.get(runtime, runtime),
        "limit": LIST_LIMIT,
        "baseline": _measure_cells(baseline, None),
        "rows": [_stage_row(i, s, baseline, runtime) for i, s in enumerate(items)],
        "final": _measure_cells(report.get("final"), baseline),
        "total": DASH if total is None else f"total {fmt_seconds(total)}",
    }


def _shape(layer: Any) -> str:
    """A weight shape as ``16×6×5×5``; a layer merged from parts shows each part's."""
    parts = as_list(dig(layer, "part_shapes"))
    if parts:
        return " + ".join(_shape({"weight_shape": p}) for p in parts)
    shape = as_list(dig(layer, "weight_shape"))
    return "×".join(str(d) for d in shape) if shape else DASH


def _sparsity(layer: Any) -> str:
    params, nonzero = finite(dig(layer, "params")), finite(dig(layer, "nonzero_params"))
    return fmt_pct(1.0 - nonzero / params) if params and nonzero is not None else DASH


def _type(base: Any, final: Any) -> str:
    """The layer's type; ``Conv2d → QuantLayer`` when a technique replaced it."""
    b, f = dig(base, "type"), dig(final, "type")
    if b is not None and f is not None and b != f:
        return f"{fmt_value(b)} → {fmt_value(f)}"
    return fmt_value(b if f is None else f)


def layers(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer, baseline -> final: type, weight shape (channels), params, bits per weight,
    sparsity, MACs, latency, each value a (baseline, final) pair of texts. Final layers that
    replaced a baseline layer (a quantized wrapper, the parts of a factorized layer) are lined
    up under its name (see :func:`slimkit.report.layers.layer_pairs`)."""

    def pair(key: str, fmt: Callable[[Any], str]) -> tuple[str, str]:
        return fmt(dig(b, key)), fmt(dig(f, key))

    rows = []
    for name, b, f in layer_pairs(dig(report, "baseline", "layers"),
                                  dig(report, "final", "layers")):
        rows.append({
            "name": name,
            "type": _type(b, f),
            "shape": (_shape(b) if b else DASH, _shape(f) if f else "removed"),
            "params": pair("params", fmt_int),
            "bits": pair("weight_bits", fmt_bits),
            "sparsity": _sparsity(f) if f else DASH,
            "macs": pair("macs", fmt_int),
            "latency": pair("latency_ms", fmt_ms),
        })
    return rows
