"""``search.html``: the Pareto fronts (metric vs latency, metric vs size) with the chosen
point and the hand-written recipe marked, and a table of the top trials. Self-contained:
the plots are inline SVG drawn with matplotlib's Agg-free SVG canvas (no pyplot)."""

from __future__ import annotations

import io
from pathlib import Path

from slimkit.core.files import write_text
from slimkit.report.fmt import esc

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


def _rows(result: dict) -> str:
    done = [t for t in result["trials"] if t["state"] == "COMPLETE" and t["measured"]]
    sign = -1 if result["higher_is_better"] else 1
    done.sort(key=lambda t: (not t["feasible"], sign * t["measured"]["metric"]))
    out = []
    for t in done[:TOP]:
        m = t["measured"]
        lat = f"{m['time_ratio']:.3f}" if m.get("time_ratio") else "-"
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        out.append(f"<tr><td>{t['number']}</td><td>{m['metric']:.4f}</td><td>{lat}</td>"
                   f"<td>{m['size_share']:.3f}</td><td>{m['flops_share']:.3f}</td>"
                   f"<td>{'yes' if t['feasible'] else 'no'}</td><td>{esc(params)}</td></tr>")
    return "\n".join(out)


def render(result: dict) -> str:
    """The page's HTML."""
    chosen = result["chosen"]
    plots = "".join(f"<figure>{_figure(result, key, label)}</figure>" for key, label in (
        ("time_ratio", f"latency / baseline ({result['latency']['runtime']}, batch "
                       f"{result['latency']['batch']})"),
        ("size_share", "size on disk / baseline")))
    states: dict[str, int] = {}
    for t in result["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>slimkit search</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}
figure{{display:inline-block;margin:4px}} td,th{{padding:2px 8px;text-align:right}}
td:last-child{{text-align:left}}</style></head><body>
<h1>Compression search</h1>
<p>{len(result['trials'])} trials ({esc(counts)}) in {result['seconds']:.0f} s; objectives
{esc(', '.join(result['objectives']))}. Chosen: {esc(chosen['label'])}, {esc(chosen['why'])};
target {'met' if chosen['met'] else 'missed'}. Trials show the proxy metric (BatchNorm
re-estimated); the front, the chosen point and the hand-written recipe are measured as the
recipe is written.</p>
{plots}
<h2>Top trials</h2><table><tr><th>trial</th><th>{esc(result['metric'])}</th>
<th>latency ratio</th><th>size share</th><th>FLOPs share</th><th>feasible</th>
<th>choices</th></tr>
{_rows(result)}</table></body></html>
"""


def write_report(result: dict, out: Path) -> Path:
    """Write ``out/search.html``; its path."""
    path = Path(out) / "search.html"
    write_text(path, render(result))
    return path


__all__ = ["render", "write_report"]
