"""The report's early-exit section: where samples leave, what each exit gets right, what the
exits save (mean and p90 latency, mean MACs per sample against the static model), and top-1
against mean latency (or MACs) as the thresholds sweep.

It reads the ``early_exit`` stage's record (``report["stages"][i]["details"]``); a report
without such a stage has no section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.report.fmt import as_list, as_mapping, finite
from slimkit.report.render import render


def _ok(value: Any) -> bool:
    return finite(value) is not None


def _stage(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for st in reversed(as_list(report.get("stages"))):
        st = as_mapping(st)
        if st.get("kind") == "early_exit" and as_mapping(st.get("details")).get("thresholds"):
            return as_mapping(st["details"])
    return None


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if _ok(v) else "—"


def _ms(v: Any) -> str:
    return f"{v:.3f} ms" if _ok(v) else "—"


def _exit_rows(d: Mapping[str, Any], split: str) -> list[tuple[str, str, str, str, str]]:
    """Per exit, then the final head: (block, threshold, share of samples leaving there,
    top-1 of those samples, MACs per sample on that path)."""
    s = as_mapping(d.get(split))
    names = [as_mapping(e).get("block") for e in as_list(d.get("exits"))] + ["final head"]
    thresholds = [*as_list(d.get("thresholds")), None]
    macs = as_list(as_mapping(d.get("costs")).get("path_macs"))
    fractions, top1 = as_list(s.get("exit_fraction")), as_list(s.get("exit_top1"))
    rows = []
    for k, name in enumerate(names):
        t = thresholds[k] if k < len(thresholds) else None
        rows.append((
            str(name),
            "—" if t is None else f"{t:.4g}",
            _pct(fractions[k] if k < len(fractions) else None),
            _pct(top1[k] if k < len(top1) else None),
            f"{macs[k]:,}" if k < len(macs) and _ok(macs[k]) else "—",
        ))
    return rows


def _savings(d: Mapping[str, Any], split: str) -> list[str]:
    s = as_mapping(d.get(split))
    costs = as_mapping(d.get("costs"))
    lat = as_mapping(d.get("latency"))
    ratio = costs.get(f"mean_macs_ratio_{split}")
    items = [
        f"top-1 ({split}): {_pct(s.get('static_top1'))} static → {_pct(s.get('top1'))} "
        "with exits",
        f"mean MACs per sample: {_pct(ratio)} of the static model's "
        f"({costs.get('static_macs', 0):,} MACs)" if _ok(ratio) else "mean MACs: —",
    ]
    margin = as_mapping(d.get("margin"))
    if _ok(margin.get("val_drop")):
        level = margin.get("level")
        items.append(
            f"thresholds chosen on the validation split: drop there {margin['val_drop']:.2f} "
            "points" + (f", its one-sided {100 * level:.0f}% upper bound "
                        f"{margin['val_drop_bound']:.2f} points ({margin.get('method')}) kept "
                        "within the target" if _ok(level) else " (no safety margin)"))
    if lat:
        lo, hi = (as_list(lat.get("time_ratio_ci95")) + [None, None])[:2]
        ci = (f" (95% CI {1 / hi:.2f}–{1 / lo:.2f}x)" if _ok(lo) and _ok(hi) and lo > 0
              and hi > 0 else "")
        items.append(
            f"batch-1 latency, {lat.get('runtime', '')}, {lat.get('samples')} "
            f"{lat.get('split', '')} samples: mean {_ms(lat.get('mean_ms'))} vs "
            f"{_ms(lat.get('static_mean_ms'))} static, p90 {_ms(lat.get('p90_ms'))} vs "
            f"{_ms(lat.get('static_p90_ms'))}; speedup of the mean "
            f"{lat.get('speedup', float('nan')):.2f}x{ci}")
    return items


def _sweep_plot(d: Mapping[str, Any]) -> str | None:
    """Top-1 against mean latency (estimated from each path's measured latency) or, without
    timings, mean MACs, one point per allowed drop of the threshold sweep, as a PNG data
    URI; None without a complete sweep."""
    from slimkit.report.plots import _new_figure, _to_data_uri

    points = [as_mapping(p) for p in as_list(d.get("sweep"))]
    timed = all(_ok(p.get("mean_ms_estimate")) for p in points) and points
    xs = [p.get("mean_ms_estimate") if timed else p.get("mean_cost") for p in points]
    ys = [100 * p["top1"] for p in points if _ok(p.get("top1"))]
    if not points or len(ys) != len(points) or not all(_ok(x) for x in xs):
        return None
    fig, ax = _new_figure(6.4, 4.0)
    ax.plot(xs, ys, marker="o", color="#2f81f7")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"≤{p.get('max_drop')}", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    ax.set_xlabel("mean latency per sample (ms, estimated)" if timed else "mean MACs per sample")
    ax.set_ylabel(f"top-1 (%), {d.get('sweep_split', '')}")
    ax.set_title("Top-1 vs mean cost as the thresholds sweep", fontsize=11)
    ax.grid(True, alpha=0.3)
    return _to_data_uri(fig)


def early_exit(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The section's data (``templates/early_exit.html.j2``), or None when the run had no
    early-exit stage with exits."""
    d = _stage(report)
    if d is None:
        return None
    split = "test" if d.get("test") else "val"
    return {"split": split, "savings": _savings(d, split), "rows": _exit_rows(d, split),
            "sweep": _sweep_plot(d)}


def early_exit_section(report: Mapping[str, Any]) -> str:
    """The section's HTML, or ``""`` when the run had no early-exit stage with exits."""
    view = early_exit(report)
    return "" if view is None else render("early_exit.html.j2", early_exit=view)
