"""HTML of the report's two tables: baseline vs final, and one row per pipeline stage.

Missing values render as an em dash; a row is kept even when both sides are missing
for the metrics every report should have, so that a reader sees what was not measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from slimkit.report.fmt import (
    DASH,
    RUNTIME_NAMES,
    as_list,
    as_mapping,
    batch_sort_key,
    by_batch,
    dig,
    esc,
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


def _ratio_cell(base: Any, final: Any, better: str, worse: str, ratio: Any = None) -> str:
    """``base / final`` as ``3.90× smaller`` (green) or ``1.20× larger`` (red)."""
    value = finite(ratio)
    if value is None:
        b, f = finite(base), finite(final)
        value = b / f if b is not None and f else None
    if value is None or value <= 0:
        return f'<td class="num na">{DASH}</td>'
    if abs(value - 1) < 5e-3:
        return '<td class="num na">unchanged</td>'
    if value > 1:
        return f'<td class="num good">{value:.2f}× {esc(better)}</td>'
    return f'<td class="num worse">{1 / value:.2f}× {esc(worse)}</td>'


def _speed_cell(entry: Any, base_ms: Any, final_ms: Any) -> str:
    """The speedup of a comparison entry with its 95% interval (``no change`` when it
    holds 1); from the two medians when the report has no entry."""
    speedup = finite(dig(entry, "speedup"))
    if speedup is None:
        b, f = finite(base_ms), finite(final_ms)
        speedup = b / f if b is not None and f else None
    text, tone = speed_change(speedup, dig(entry, "speedup_ci95"))
    return f'<td class="num {tone}">{esc(text)}</td>'


def _delta_cell(base: Any, final: Any) -> str:
    """An accuracy change in percentage points."""
    b, f = finite(base), finite(final)
    if b is None or f is None:
        return f'<td class="num na">{DASH}</td>'
    delta = (f - b) * 100
    tone = "na" if abs(delta) < 5e-3 else "good" if delta > 0 else "worse"
    return f'<td class="num {tone}">{delta:+.2f} pts</td>'


def _row(label: str, base: str, final: str, change: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<tr{attr}><th scope="row">{esc(label)}</th><td class="num">{esc(base)}</td>'
        f'<td class="num">{esc(final)}</td>{change}</tr>'
    )


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


def _latency_rows(report: Mapping[str, Any]) -> str:
    runtimes, batches = _latency_axes(report)
    rows = []
    for runtime in runtimes:
        rows.append(
            f'<tr class="group"><td colspan="4">Latency, '
            f"{esc(RUNTIME_NAMES.get(runtime, runtime))}</td></tr>"
        )
        for batch in batches:
            base = by_batch(dig(report, "baseline", "latency", runtime), batch)
            final = by_batch(dig(report, "final", "latency", runtime), batch)
            entry = by_batch(dig(report, "comparison", runtime), batch)
            for stat, label in (("median_ms", "median"), ("p90_ms", "p90")):
                b, f = dig(base, stat), dig(final, stat)
                # The change is the median of paired per-round ratios, with its interval; a
                # ratio of two p90s has none, so the p90 row shows the times only.
                change = (_speed_cell(entry, b, f) if stat == "median_ms"
                          else '<td class="num na"></td>')
                rows.append(_row(f"batch {batch}, {label}", fmt_ms(b), fmt_ms(f), change, "sub"))
    return "".join(rows)


def before_after(report: Mapping[str, Any]) -> str:
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
    if base.get("accuracy") is not None or final.get("accuracy") is not None or not (
            base.get("metrics") or final.get("metrics")):
        for label, key in (("Top-1 accuracy", "top1"), ("Top-5 accuracy", "top5")):
            b, f = dig(base, "accuracy", key), dig(final, "accuracy", key)
            rows.append(_row(label, fmt_pct(b), fmt_pct(f), _delta_cell(b, f)))
    else:  # another task's metrics (perplexity, cosine, MSE...), in their own units
        metrics = {**as_mapping(base.get("metrics")), **as_mapping(final.get("metrics"))}
        for key in metrics:
            b, f = finite(dig(base, "metrics", key)), finite(dig(final, "metrics", key))
            change = (f'<td class="num">{f - b:+.4g}</td>' if b is not None and f is not None
                      else f'<td class="num na">{DASH}</td>')
            rows.append(_row(key.replace("_", " ").capitalize(), fmt_value(b), fmt_value(f),
                             change))
    return (
        '<section id="before-after"><h2>Baseline vs final</h2>'
        '<table class="compare"><thead><tr><th>Metric</th><th class="num">Baseline</th>'
        '<th class="num">Final</th><th class="num">Change</th></tr></thead><tbody>'
        f"{''.join(rows)}{_latency_rows(report)}</tbody></table></section>"
    )


def _items(values: list[Any], render: Callable[[Any], str]) -> str:
    """A bullet list; past :data:`LIST_LIMIT` items the rest fold into a <details>."""
    if not values:
        return f'<span class="na">{DASH}</span>'
    shown = "".join(f"<li>{render(v)}</li>" for v in values[:LIST_LIMIT])
    out = f'<ul class="items">{shown}</ul>'
    if len(values) > LIST_LIMIT:
        rest = "".join(f"<li>{render(v)}</li>" for v in values[LIST_LIMIT:])
        out += (
            f"<details><summary>and {len(values) - LIST_LIMIT} more</summary>"
            f'<ul class="items">{rest}</ul></details>'
        )
    return out


def _skip_item(item: Any) -> str:
    """``what`` — ``why`` for a skipped entry (a dict), or the entry itself."""
    if isinstance(item, Mapping) and ("what" in item or "why" in item):
        what = esc(fmt_value(item.get("what")))
        why = item.get("why")
        return f"<code>{what}</code>" + (f": {esc(fmt_value(why))}" if why is not None else "")
    return esc(fmt_value(item))


def _top1_cell(measure: Any, baseline: Any) -> str:
    """The stage's quality (top-1, or the task's primary metric) and its change."""
    found, base = quality(measure), quality(baseline) if baseline is not None else None
    if found is None:
        return f'<td class="num na">{DASH}</td>'
    label, value = found
    top1 = label.startswith("top-1")
    note = ""
    if base is not None and base[0] == label:
        delta = f"{value - base[1]:+.2f} pts" if top1 else f"{value - base[1]:+.4g}"
        note = f'<div class="small">{delta}</div>'
    shown = fmt_pct(value / 100) if top1 else f"{value:.4g}"
    return f'<td class="num">{esc(shown)}{note}</td>'


def _measure_cells(measure: Any, baseline_top1: Any) -> str:
    return (
        f"{_top1_cell(measure, baseline_top1)}"
        f'<td class="num">{esc(fmt_bytes(dig(measure, "size_bytes")))}</td>'
        f'<td class="num">{esc(fmt_int(dig(measure, "nonzero_params")))}</td>'
    )


def _stage_speed(stage: Mapping[str, Any], runtime: str) -> str:
    """The stage's latency change in ``runtime`` from the model it started from, per batch
    with its 95% interval (timed interleaved), then its flags: a stage that made the runtime
    slower, and the layers whose time grew."""
    per_batch = as_mapping(dig(stage, "latency_change", runtime))
    lines = []
    for batch in sorted(per_batch, key=batch_sort_key):
        ratio = finite(dig(per_batch[batch], "time_ratio"))  # new time / old time
        ci = [finite(x) for x in as_list(dig(per_batch[batch], "ci95"))]
        speedup_ci = [1 / ci[1], 1 / ci[0]] if len(ci) == 2 and all(ci) else None
        text, tone = speed_change(1 / ratio if ratio else None, speedup_ci)
        lines.append(f'<div class="{tone}">batch {esc(batch)}: {esc(text)}</div>')
    lines += [f'<div class="small worse">⚠ {esc(fmt_value(flag))}</div>'
              for flag in as_list(stage.get("flags"))]
    return f"<td>{''.join(lines)}</td>" if lines else f'<td class="na">{DASH}</td>'


def _stage_row(position: int, stage: Any, baseline_top1: Any, runtime: str) -> str:
    stage = as_mapping(stage)
    index = stage.get("index", position)
    kind = esc(fmt_value(stage.get("kind", "stage")))
    details = stage.get("details")
    if details:
        kind += f"<details><summary>details</summary><pre>{esc(fmt_json(details))}</pre></details>"
    return (
        f'<tr class="stage"><td class="num">{esc(fmt_value(index))}</td><td>{kind}</td>'
        f"<td>{_items(as_list(stage.get('changed')), lambda v: esc(fmt_value(v)))}</td>"
        f"<td>{_items(as_list(stage.get('skipped')), _skip_item)}</td>"
        f"{_measure_cells(stage.get('measure'), baseline_top1)}"
        f"{_stage_speed(stage, runtime)}"
        f'<td class="num">{esc(fmt_seconds(stage.get("seconds")))}</td></tr>'
    )


def stages(report: Mapping[str, Any]) -> str:
    """One row per stage, framed by the baseline and the final model for reference."""
    items = as_list(report.get("stages"))
    baseline = report.get("baseline")
    base_top1 = baseline
    seconds = [finite(dig(s, "seconds")) for s in items]
    total = (
        sum(s for s in seconds if s is not None) if any(s is not None for s in seconds) else None
    )
    total_text = DASH if total is None else f"total {fmt_seconds(total)}"
    runtime = str(dig(report, "target", "min_speedup", "runtime") or "onnxruntime")
    rows = [
        '<tr class="ref"><td></td><td>baseline</td><td></td><td></td>'
        f"{_measure_cells(baseline, None)}<td></td><td></td></tr>"
    ]
    rows += [_stage_row(i, s, base_top1, runtime) for i, s in enumerate(items)]
    if not items:
        rows.append('<tr><td colspan="9" class="na">No stage was run.</td></tr>')
    rows.append(
        '<tr class="ref"><td></td><td>final</td><td></td><td></td>'
        f"{_measure_cells(report.get('final'), base_top1)}<td></td>"
        f'<td class="num">{esc(total_text)}</td></tr>'
    )
    found = quality(baseline)
    header = "Top-1" if found is None or found[0].startswith("top-1") else found[0].capitalize()
    return (
        '<section id="stages"><h2>Stages</h2><table class="stages"><thead><tr>'
        '<th class="num">#</th><th>Kind</th><th>What changed</th><th>Skipped, and why</th>'
        f'<th class="num">{esc(header)}</th><th class="num">Size</th><th class="num">Non-zero '
        f'params</th><th>Speed vs the model before ({esc(RUNTIME_NAMES.get(runtime, runtime))}'
        ', 95% CI)</th><th class="num">Time</th></tr></thead><tbody>'
        f"{''.join(rows)}</tbody></table></section>"
    )


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


def layers(report: Mapping[str, Any]) -> str:
    """Per layer, baseline -> final: type, weight shape (channels), params, bits per weight,
    sparsity, MACs, latency. Final layers that replaced a baseline layer (a quantized wrapper,
    the parts of a factorized layer) are lined up under its name (see
    :func:`slimkit.report.layers.layer_pairs`)."""
    pairs = layer_pairs(dig(report, "baseline", "layers"), dig(report, "final", "layers"))
    if not pairs:
        return ""

    def pair(b: Any, f: Any, fmt: Callable[[Any], str]) -> str:
        return f'<td class="num">{esc(fmt(b))} → {esc(fmt(f))}</td>'

    rows = []
    for name, b, f in pairs:
        rows.append(
            f"<tr><td><code>{esc(name)}</code></td>"
            f"<td>{esc(_type(b, f))}</td>"
            f'<td class="num">{esc(_shape(b) if b else DASH)} → '
            f"{esc(_shape(f) if f else 'removed')}</td>"
            f"{pair(dig(b, 'params'), dig(f, 'params'), fmt_int)}"
            f"{pair(dig(b, 'weight_bits'), dig(f, 'weight_bits'), fmt_bits)}"
            f'<td class="num">{esc(_sparsity(f) if f else DASH)}</td>'
            f"{pair(dig(b, 'macs'), dig(f, 'macs'), fmt_int)}"
            f"{pair(dig(b, 'latency_ms'), dig(f, 'latency_ms'), fmt_ms)}</tr>")
    return (
        '<section id="layers"><h2>Layers</h2><p class="small">Baseline → final. Shapes are '
        "weight shapes (output, input channels first); a layer replaced by several (low-rank "
        "factors) shows their shapes and sums their values. Parameters count every weight a "
        "layer computes with, whatever its storage; bits are bits per weight (32 for float32, "
        "the code width once quantized; scales and zero points not included). Sparsity is the "
        "share of zeros in the final layer's parameters; latency is each layer's median time "
        "in PyTorch eager at batch 1 on one thread, measured inside whole forward passes.</p>"
        "<table class=\"layers\"><thead><tr><th>Layer</th><th>Type</th><th>Weight shape</th>"
        "<th>Parameters</th><th>Bits</th>"
        "<th>Sparsity</th><th>MACs</th><th>Latency</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></section>"
    )
