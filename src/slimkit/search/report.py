"""``search.html``: the Pareto fronts (metric vs latency, metric vs size) with the chosen
point and the hand-written recipe marked, and a table of the top trials. Self-contained:
the plots are inline SVG drawn with matplotlib's Agg-free SVG canvas (no pyplot); the page
is the template ``report/templates/search.html.j2`` (autoescaped)."""

from __future__ import annotations

import io
from pathlib import Path

from slimkit.core.files import write_text
from slimkit.report.render import render as _render

TOP = 10


def _figure(result: dict, x_key: str, xlabel: str) -> str:
    """One scatter as inline SVG: trials (proxy), front (real), chosen, hand, baseline."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    metric = result["metric"]
    trials = [t for t in result["trials"] if t["state"] == "COMPLETE" and t["measured"]
              and t["measured"].get(x_key) is not None]
    ax.scatter([t["measured"][x_key] for t in trials], [t["measured"]["metric"] for t in trials],
               s=14, c=["#2f81f7" if t["feasible"] else "#8c959f" for t in trials],
               label="trials (proxy: feasible blue, other grey)")
    real = [p for p in result["front"] if p["measured"].get(x_key) is not None]
    ax.scatter([p["measured"][x_key] for p in real], [p["measured"]["metric"] for p in real],
               s=40, facecolors="none", edgecolors="#1a7f37", label="front, measured for real")
    chosen = result["chosen"]["measured"]
    if chosen.get(x_key) is not None:
        ax.scatter([chosen[x_key]], [chosen["metric"]], marker="*", s=180, c="#1a7f37",
                   label="chosen")
    hand = result["hand"].get("measured")
    if hand and hand.get(x_key) is not None:
        ax.scatter([hand[x_key]], [hand["metric"]], marker="X", s=90, c="#cf222e",
                   label="hand-written recipe")
    ax.scatter([1.0], [result["baseline"]["metrics"][metric]], marker="s", s=40, c="black",
               label="baseline")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (validation split)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _rows(result: dict) -> list[tuple[str, ...]]:
    """The top trials (feasible first, best metric first) as table cells."""
    done = [t for t in result["trials"] if t["state"] == "COMPLETE" and t["measured"]]
    sign = -1 if result["higher_is_better"] else 1
    done.sort(key=lambda t: (not t["feasible"], sign * t["measured"]["metric"]))
    out = []
    for t in done[:TOP]:
        m = t["measured"]
        out.append((str(t["number"]), f"{m['metric']:.4f}",
                    f"{m['time_ratio']:.3f}" if m.get("time_ratio") else "-",
                    f"{m['size_share']:.3f}", f"{m['flops_share']:.3f}",
                    "yes" if t["feasible"] else "no",
                    "yes" if t.get("enqueued") else "no",
                    ", ".join(f"{k}={v}" for k, v in t["params"].items())))
    return out


def _drop_cell(d: dict) -> str:
    if "error" in d:
        return f"{d['choice']}: failed"
    if d.get("drop") is None:
        return f"{d['choice']}: not measured (capped)"
    return f"{d['choice']}: " + ("\u2014" if d["drop"] == 0 else f"{d['drop']:.4g}")


def _sensitivity(result: dict) -> dict | None:
    """The sensitivity tier's summary and one row per measured dimension (None when off)."""
    sens = result.get("sensitivity")
    if not sens:
        return None
    budget = "none" if sens["budget"] is None else f"{sens['budget']:.4g}"
    how = f"reused from {sens['source']}" if sens["cached"] else "measured"
    summary = (f"{sens['unit']}; budget {budget} from {sens['budget_from']}; "
               f"{sens['excluded']} settings excluded; {how} ({sens['seconds']:.1f} s)")
    if not sens["shaped"]:
        summary += "; space not shaped"
    rows = [{"name": r["name"], "layers": ", ".join(r["layers"]),
             "drops": [_drop_cell(d) for d in r["drops"]],
             "kept": ", ".join(str(c) for c in r["kept"]),
             "excluded": [f"{e['choice']} \u2014 {e['why']}" for e in r["excluded"]],
             "note": r.get("note") or ""} for r in sens["dims"]]
    seeds = [", ".join(f"{k}={v}" for k, v in a.items()) for a in sens["seeds"]]
    return {"summary": summary, "rows": rows, "seeds": seeds}


def render(result: dict) -> str:
    """The page's HTML (``report/templates/search.html.j2``)."""
    states: dict[str, int] = {}
    for t in result["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    latency = (f"latency / baseline ({result['latency']['runtime']}, batch "
               f"{result['latency']['batch']})")
    return _render(
        "search.html.j2",
        trials=len(result["trials"]),
        counts=", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
        seconds=f"{result['seconds']:.0f}",
        objectives=", ".join(result["objectives"]),
        chosen=result["chosen"],
        # matplotlib writes the SVG and escapes its text: the one markup not from a template
        plots=[_figure(result, key, label) for key, label in (
            ("time_ratio", latency), ("size_share", "size on disk / baseline"))],
        metric=result["metric"],
        rows=_rows(result),
        sensitivity=_sensitivity(result),
    )


def write_report(result: dict, out: Path) -> Path:
    """Write ``out/search.html``; its path."""
    path = Path(out) / "search.html"
    write_text(path, render(result))
    return path


__all__ = ["render", "write_report"]
