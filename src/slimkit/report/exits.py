"""The report's early-exit section: where samples leave, what each exit gets right, what the
exits save (mean and p90 latency, mean MACs per sample against the static model), and top-1
against mean latency (or MACs) as the thresholds sweep.

It reads the ``early_exit`` stage's record (``report["stages"][i]["details"]``); a report
without such a stage has no section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.report.fmt import as_list, as_mapping, esc, finite


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


def _exit_table(d: Mapping[str, Any], split: str) -> str:
    s = as_mapping(d.get(split))
    rows = []
    names = [as_mapping(e).get("block") for e in as_list(d.get("exits"))] + ["final head"]
    thresholds = [*as_list(d.get("thresholds")), None]
    macs = as_list(as_mapping(d.get("costs")).get("path_macs"))
    for k, name in enumerate(names):
        frac = as_list(s.get("exit_fraction"))[k] if k < len(as_list(s.get("exit_fraction"))) \
            else None
        acc = as_list(s.get("exit_top1"))[k] if k < len(as_list(s.get("exit_top1"))) else None
        t = thresholds[k] if k < len(thresholds) else None
        rows.append(f"<tr><td>{esc(name)}</td><td>{'—' if t is None else f'{t:.4g}'}</td>"
                    f"<td>{_pct(frac)}</td><td>{_pct(acc)}</td>"
                    f"<td>{f'{macs[k]:,}' if k < len(macs) and _ok(macs[k]) else '—'}</td>"
                    "</tr>")
    return ("<table><thead><tr><th>Exit after</th><th>Threshold</th>"
            f"<th>Samples leaving ({esc(split)})</th><th>Top-1 there</th><th>MACs per sample"
            "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _savings(d: Mapping[str, Any], split: str) -> str:
    s = as_mapping(d.get(split))
    costs = as_mapping(d.get("costs"))
    lat = as_mapping(d.get("latency"))
    ratio = costs.get(f"mean_macs_ratio_{split}")
    items = [
        f"top-1 ({esc(split)}): {_pct(s.get('static_top1'))} static → {_pct(s.get('top1'))} "
        "with exits",
        f"mean MACs per sample: {_pct(ratio)} of the static model's "
        f"({costs.get('static_macs', 0):,} MACs)" if _ok(ratio) else "mean MACs: —",
    ]
    if lat:
        lo, hi = (as_list(lat.get("time_ratio_ci95")) + [None, None])[:2]
        ci = (f" (95% CI {1 / hi:.2f}–{1 / lo:.2f}x)" if _ok(lo) and _ok(hi) and lo > 0
              and hi > 0 else "")
        items.append(
            f"batch-1 latency, {esc(lat.get('runtime', ''))}, {lat.get('samples')} "
            f"{esc(lat.get('split', ''))} samples: mean {_ms(lat.get('mean_ms'))} vs "
            f"{_ms(lat.get('static_mean_ms'))} static, p90 {_ms(lat.get('p90_ms'))} vs "
            f"{_ms(lat.get('static_p90_ms'))}; speedup of the mean "
            f"{lat.get('speedup', float('nan')):.2f}x{ci}")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _sweep_plot(d: Mapping[str, Any]) -> str:
    """Top-1 against mean latency (estimated from each path's measured latency) or, without
    timings, mean MACs, one point per allowed drop of the threshold sweep."""
    from slimkit.report.plots import _new_figure, _to_data_uri

    points = [as_mapping(p) for p in as_list(d.get("sweep"))]
    timed = all(_ok(p.get("mean_ms_estimate")) for p in points) and points
    xs = [p.get("mean_ms_estimate") if timed else p.get("mean_cost") for p in points]
    ys = [100 * p["top1"] for p in points if _ok(p.get("top1"))]
    if not points or len(ys) != len(points) or not all(_ok(x) for x in xs):
        return '<p class="na">No threshold sweep recorded.</p>'
    fig, ax = _new_figure(6.4, 4.0)
    ax.plot(xs, ys, marker="o", color="#2f81f7")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"≤{p.get('max_drop')}", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    ax.set_xlabel("mean latency per sample (ms, estimated)" if timed else "mean MACs per sample")
    ax.set_ylabel(f"top-1 (%), {d.get('sweep_split', '')}")
    ax.set_title("Top-1 vs mean cost as the thresholds sweep", fontsize=11)
    ax.grid(True, alpha=0.3)
    uri = _to_data_uri(fig)
    return (f'<figure><img src="{uri}" alt="top-1 vs mean cost"><figcaption>Each point: '
            "thresholds chosen on the validation split for the allowed top-1 drop (points) "
            "it is labelled with.</figcaption></figure>")


def early_exit_section(report: Mapping[str, Any]) -> str:
    """The section's HTML, or ``""`` when the run had no early-exit stage with exits."""
    d = _stage(report)
    if d is None:
        return ""
    split = "test" if d.get("test") else "val"
    return ('<section id="early-exit"><h2>Early exits</h2>' + _savings(d, split)
            + _exit_table(d, split) + _sweep_plot(d) + "</section>")
