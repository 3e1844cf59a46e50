"""Plots of the report, drawn with matplotlib's Agg canvas and embedded as PNG data URIs.

Figures are built as :class:`matplotlib.figure.Figure` objects on an explicit
``FigureCanvasAgg``: no pyplot, so no global figure registry, no GUI backend and
no dependence on the ``MPLBACKEND`` the caller has set. matplotlib is imported
lazily so that importing slimkit stays cheap.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimkit.report.fmt import (
    RUNTIME_NAMES,
    as_list,
    as_mapping,
    by_batch,
    dig,
    finite,
    quality,
)
from slimkit.report.layers import layer_pairs

#: At most this many layers are drawn in the per-layer bars (the largest ones).
MAX_LAYERS = 40

_BASE_COLOR = "#8c959f"
_STAGE_COLOR = "#2f81f7"
_FINAL_COLOR = "#1a7f37"
_NONZERO_COLOR = "#bf8700"


@dataclass(frozen=True)
class Plot:
    """One figure of the report: a data URI, or the reason it could not be drawn."""

    title: str
    caption: str
    uri: str | None = None
    missing: str = ""


def build_plots(report: Mapping[str, Any]) -> list[Plot]:
    """Draw every plot of the report; a plot whose data is absent says why instead."""
    baseline = as_mapping(report.get("baseline"))
    final = as_mapping(report.get("final"))
    series = _series(report)
    return [
        _accuracy_vs_size(series),
        _accuracy_vs_latency(report, series),
        _layer_plot(baseline, final, "params", "Parameters per layer"),
        _layer_plot(baseline, final, "macs", "MACs per layer"),
    ]


def _series(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(label, role, measure) for the baseline, each stage that has a measure, and the final."""
    out: list[tuple[str, str, Mapping[str, Any]]] = []
    if isinstance(report.get("baseline"), Mapping):
        out.append(("baseline", "baseline", report["baseline"]))
    for position, stage in enumerate(as_list(report.get("stages"))):
        measure = dig(stage, "measure")
        if isinstance(measure, Mapping):
            index = dig(stage, "index")
            index = position if index is None else index
            out.append((f"#{index} {dig(stage, 'kind') or 'stage'}", "stage", measure))
    if isinstance(report.get("final"), Mapping):
        out.append(("final", "final", report["final"]))
    return out


def _top1_percent(measure: Mapping[str, Any]) -> float | None:
    """The plotted quality: top-1 in percent, or another task's primary metric."""
    found = quality(measure)
    return None if found is None else found[1]


def _quality_word(series: list) -> str:
    label = _quality_label(series)
    return "Accuracy" if label.startswith("top-1") else label.replace("_", " ").capitalize()


def _quality_label(series: list) -> str:
    for _, _, m in series:
        found = quality(m)
        if found is not None:
            return found[0]
    return "top-1 accuracy (%)"


def _accuracy_vs_size(series: list[tuple[str, str, Mapping[str, Any]]]) -> Plot:
    title = f"{_quality_word(series)} vs size"
    what = _quality_label(series).removesuffix(" (%)").capitalize()
    caption = f"{what} against size on disk, from the baseline through each stage."
    points = [
        (label, role, finite(dig(m, "size_bytes")), _top1_percent(m)) for label, role, m in series
    ]
    points = [p for p in points if p[2] is not None and p[3] is not None]
    if not points:
        return Plot(title, caption, missing="no stage has both a size and an accuracy")
    scale, unit = _byte_scale(max(p[2] for p in points))
    scaled = [(label, role, x / scale, y) for label, role, x, y in points]
    uri = _trajectory(scaled, f"size on disk ({unit})", title, _quality_label(series))
    return Plot(title, caption, uri)


def _byte_scale(largest: float) -> tuple[float, str]:
    for scale, unit in ((1024.0**3, "GiB"), (1024.0**2, "MiB"), (1024.0, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def _latency_key(report: Mapping[str, Any], series: list) -> tuple[str, str] | None:
    """The (runtime, batch) to plot: the target's if measured, else the best covered one."""
    candidates: list[tuple[str, str]] = []
    speedup = dig(report, "target", "min_speedup")
    if isinstance(speedup, Mapping) and speedup.get("runtime") and speedup.get("batch"):
        candidates.append((str(speedup["runtime"]), str(speedup["batch"])))
    candidates += [("onnxruntime", "1"), ("torch", "1")]
    for _, _, measure in series:
        for runtime, per_batch in as_mapping(dig(measure, "latency")).items():
            candidates += [(str(runtime), str(batch)) for batch in as_mapping(per_batch)]

    def covered(key: tuple[str, str]) -> int:
        return sum(_latency_ms(m, key) is not None for _, _, m in series)

    best = max(candidates, key=covered)  # max keeps the first of equals: preference order
    return best if covered(best) else None


def _latency_ms(measure: Mapping[str, Any], key: tuple[str, str]) -> float | None:
    return finite(dig(by_batch(dig(measure, "latency", key[0]), key[1]), "median_ms"))


def _accuracy_vs_latency(report: Mapping[str, Any], series: list) -> Plot:
    title = f"{_quality_word(series)} vs latency"
    key = _latency_key(report, series)
    if key is None:
        what = _quality_label(series).removesuffix(" (%)").capitalize()
        caption = f"{what} against median latency."
        return Plot(title, caption, missing="no latency was measured")
    runtime = RUNTIME_NAMES.get(key[0], key[0])
    what = _quality_label(series).removesuffix(" (%)").capitalize()
    caption = f"{what} against median latency ({runtime}, batch {key[1]})."
    points = [(label, role, _latency_ms(m, key), _top1_percent(m)) for label, role, m in series]
    points = [p for p in points if p[2] is not None and p[3] is not None]
    if not points:
        return Plot(title, caption, missing="no stage has both a latency and an accuracy")
    uri = _trajectory(points, f"median latency, ms ({runtime}, batch {key[1]})", title,
                      _quality_label(series))
    return Plot(title, caption, uri)


def _trajectory(points: list[tuple[str, str, float, float]], xlabel: str, title: str,
                ylabel: str = "top-1 accuracy (%)") -> str:
    """A connected scatter in pipeline order; points at the same spot share one label."""
    fig, ax = _new_figure(6.4, 4.2)
    xs = [p[2] for p in points]
    ys = [p[3] for p in points]
    ax.plot(xs, ys, color="#c9d1d9", linewidth=1.5, zorder=1)
    colors = {"baseline": _BASE_COLOR, "stage": _STAGE_COLOR, "final": _FINAL_COLOR}
    markers = {"baseline": "s", "stage": "o", "final": "*"}
    sizes = {"baseline": 70, "stage": 55, "final": 180}
    for role in ("baseline", "stage", "final"):
        chosen = [p for p in points if p[1] == role]
        if chosen:
            ax.scatter(
                [p[2] for p in chosen],
                [p[3] for p in chosen],
                s=sizes[role],
                c=colors[role],
                marker=markers[role],
                label=role,
                zorder=3,
                edgecolors="white",
                linewidths=0.8,
            )
    labels: dict[tuple[float, float], list[str]] = {}
    for label, _, x, y in points:
        labels.setdefault((x, y), []).append(label)
    for (x, y), names in labels.items():
        ax.annotate(
            " / ".join(names),
            (x, y),
            textcoords="offset points",
            xytext=(7, 6),
            fontsize=8,
            color="#1f2328",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.18, y=0.2)
    if max(ys) - min(ys) < 0.05:  # one level: matplotlib's default span would be ±5 points
        ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
    low, high = ax.get_ylim()
    if ylabel.startswith("top-1") and max(ys) <= 100 < high:  # accuracy stays <= 100%
        ax.set_ylim(low, max(100.2, max(ys) + 0.1))
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _to_data_uri(fig)


def _layer_rows(
    baseline: Mapping[str, Any], final: Mapping[str, Any], key: str
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(name, baseline value, final value, final non-zero params) per layer, in model order;
    final layers that replaced a baseline layer count under its name (see ``layer_pairs``)."""
    rows = [
        (
            name,
            finite(dig(base, key)),
            finite(dig(new, key)),
            finite(dig(new, "nonzero_params")) if key == "params" else None,
        )
        for name, base, new in layer_pairs(baseline.get("layers"), final.get("layers"))
    ]
    return [r for r in rows if r[1] is not None or r[2] is not None]


def _layer_plot(
    baseline: Mapping[str, Any], final: Mapping[str, Any], key: str, title: str
) -> Plot:
    what, noun = ("parameters", "Parameters") if key == "params" else ("MACs", "MACs")
    caption = f"{noun} of each layer, baseline against final."
    rows = _layer_rows(baseline, final, key)
    if not rows:
        return Plot(title, caption, missing="no per-layer measurements")
    if len(rows) > MAX_LAYERS:
        keep = sorted(rows, key=lambda r: -max(r[1] or 0, r[2] or 0))[:MAX_LAYERS]
        kept = {r[0] for r in keep}
        caption += f" The {MAX_LAYERS} largest of {len(rows)} layers are shown."
        rows = [r for r in rows if r[0] in kept]
    show_nonzero = key == "params" and any(r[3] is not None and r[3] != r[2] for r in rows)
    if show_nonzero:
        caption += " Final non-zero parameters are shown too (sparsity)."
    return Plot(title, caption, _bars(rows, what, title, show_nonzero))


def _bars(rows: list, what: str, title: str, show_nonzero: bool) -> str:
    """Horizontal grouped bars, one group per layer, first layer on top."""
    import numpy as np

    series = [("baseline", 1, _BASE_COLOR), ("final", 2, _FINAL_COLOR)]
    if show_nonzero:
        series.append(("final non-zero", 3, _NONZERO_COLOR))
    height = 0.8 / len(series)
    fig, ax = _new_figure(6.4, max(2.6, 0.22 * len(rows) * len(series) + 1.2))
    y = np.arange(len(rows))
    for offset, (label, column, color) in enumerate(series):
        values = [r[column] or 0.0 for r in rows]
        ax.barh(y - 0.4 + height * (offset + 0.5), values, height=height, color=color, label=label)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    positive = [v for r in rows for v in (r[1], r[2]) if v]
    if positive and max(positive) / min(positive) > 200:
        ax.set_xscale("log")  # layers differ by orders of magnitude: keep small ones visible
        what += " (log scale)"
    ax.set_xlabel(what)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _to_data_uri(fig)


def _new_figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _to_data_uri(fig: Any) -> str:
    """Render to PNG (no Software tag, so equal figures give equal bytes), base64-encoded."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
