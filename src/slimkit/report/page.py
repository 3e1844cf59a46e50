"""Assemble the self-contained report page and write report.json and report.html.

The page loads nothing from the network: styles are inline, plots are PNG data
URIs, there is no script, and a Content-Security-Policy forbids any other source,
so the file reads the same offline, attached to an email, or years later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimkit.core.files import write_json, write_text
from slimkit.report import sections, tables
from slimkit.report.exits import early_exit_section
from slimkit.report.fmt import dig, esc
from slimkit.report.plots import Plot, build_plots

#: Forbid every fetch: only inline styles and data: images may load.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { --ok: #1a7f37; --ok-bg: #dafbe1; --bad: #cf222e; --bad-bg: #ffebe9;
  --muted: #59636e; --line: #d1d9e0; --head: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: #1f2328; background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 30px 0 10px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
.meta, .small, figcaption, .na { color: var(--muted); }
.small { font-size: 12px; }
.banner { border: 1px solid var(--line); border-left-width: 6px; border-radius: 8px;
  padding: 14px 18px; margin: 18px 0 12px; background: var(--head); }
.banner.ok { background: var(--ok-bg); border-color: var(--ok); }
.banner.bad { background: var(--bad-bg); border-color: var(--bad); }
.banner .status { font-size: 22px; font-weight: 700; }
.banner.ok .status { color: var(--ok); }
.banner.bad .status { color: var(--bad); }
.banner table { background: rgba(255, 255, 255, 0.7); margin-top: 10px; }
.highlights { margin: 8px 0; }
.chip { display: inline-block; margin: 0 8px 6px 0; padding: 3px 10px; border-radius: 14px;
  background: var(--head); border: 1px solid var(--line); font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
thead th { background: var(--head); font-weight: 600; }
tbody th { font-weight: 500; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.group td { background: var(--head); font-weight: 600; color: var(--muted); }
tr.sub th { padding-left: 24px; }
tr.ref td { background: #fbfcfd; color: var(--muted); font-style: italic; }
table.kv th { width: 180px; background: var(--head); }
.good { color: var(--ok); font-weight: 600; }
.worse { color: var(--bad); font-weight: 600; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px;
  font-weight: 700; }
.pill.ok { background: var(--ok); color: #fff; }
.pill.bad { background: var(--bad); color: #fff; }
ul.items { margin: 0; padding-left: 16px; }
details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
pre { background: var(--head); padding: 8px; overflow: auto; font-size: 12px;
  max-height: 360px; white-space: pre-wrap; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 16px;
  align-items: start; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: 12px; margin-top: 4px; }
.missing { padding: 24px 8px; text-align: center; }
footer { margin-top: 36px; font-size: 12px; color: var(--muted); }
@media (max-width: 820px) { .plots { grid-template-columns: 1fr; } }
"""


def _figure(plot: Plot) -> str:
    if plot.uri is None:
        body = (
            f'<div class="missing na"><strong>{esc(plot.title)}</strong><br>'
            f"not available: {esc(plot.missing)}</div>"
        )
    else:
        body = f'<img src="{plot.uri}" alt="{esc(plot.title)}">'
    return f"<figure>{body}<figcaption>{esc(plot.caption)}</figcaption></figure>"


def _plots(report: Mapping[str, Any]) -> str:
    figures = "".join(_figure(p) for p in build_plots(report))
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{figures}</div></section>'


def render_html(report: Mapping[str, Any]) -> str:
    """Render the compression report as one self-contained HTML page.

    Every key of ``report`` is optional: a missing value shows as an em dash and a
    plot without data says so. Text from the report is HTML-escaped.

    Args:
        report: the report dict built by the pipeline (see ``report.json``).

    Returns:
        The page, as a string.

    Raises:
        TypeError: ``report`` is not a mapping.

    Example:
        >>> page = render_html({"model": {"name": "zoo:lenet5"}})
        >>> "zoo:lenet5" in page
        True
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"render_html expects the report dict, got {type(report).__name__}")
    name = dig(report, "model", "name")
    title = f"slimkit report: {name}" if name is not None else "slimkit report"
    body = "".join(
        (
            sections.header(report),
            sections.verdict(report),
            sections.highlights(report),
            tables.before_after(report),
            f'<section id="checks"><h2>Parity and fidelity</h2>{sections.parity(report)}</section>',
            tables.stages(report),
            tables.layers(report),
            early_exit_section(report),
            _plots(report),
            sections.environment(report),
            "<footer>Generated by slimkit. This page is self-contained: it loads nothing "
            "from the network.</footer>",
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` (the dict as is) and ``report.html`` into ``out_dir``.

    The page is rendered before anything is written, and each file is written
    atomically, so a failure leaves no half-written report behind.

    Args:
        report: the report dict built by the pipeline.
        out_dir: folder to write into; created when missing. Existing reports are replaced.

    Returns:
        ``{"json": path to report.json, "html": path to report.html}``.

    Example:
        >>> paths = write_report(report, Path("runs/lenet5"))  # doctest: +SKIP
        >>> paths["html"].name
        'report.html'
    """
    out_dir = Path(out_dir)
    page = render_html(report)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    write_json(paths["json"], dict(report))
    write_text(paths["html"], page)
    return paths
