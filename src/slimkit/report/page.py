"""Assemble the self-contained report page and write report.json and report.html.

The page is ``templates/page.html.j2`` filled with each section's data (see
:mod:`slimkit.report.sections` and :mod:`slimkit.report.tables`). It loads nothing
from the network: styles are inline, plots are PNG data URIs, there is no script,
and a Content-Security-Policy forbids any other source, so the file reads the same
offline, attached to an email, or years later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimkit.core.files import write_json, write_text
from slimkit.report import sections, tables
from slimkit.report.exits import early_exit
from slimkit.report.fmt import dig
from slimkit.report.plots import build_plots
from slimkit.report.render import render


def render_html(report: Mapping[str, Any]) -> str:
    """Render the compression report as one self-contained HTML page.

    Every key of ``report`` is optional: a missing value shows as an em dash and a
    plot without data says so. Text from the report is HTML-escaped (the templates
    autoescape).

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
    return render(
        "page.html.j2",
        title=f"slimkit report: {name}" if name is not None else "slimkit report",
        header=sections.header(report),
        verdict=sections.verdict(report),
        highlights=sections.highlights(report),
        before_after=tables.before_after(report),
        checks=sections.checks(report),
        stages=tables.stages(report),
        layers=tables.layers(report),
        early_exit=early_exit(report),
        plots=build_plots(report),
        environment=sections.environment(report),
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
        >>> paths["html"].name  # doctest: +SKIP
        'report.html'
    """
    out_dir = Path(out_dir)
    page = render_html(report)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    write_json(paths["json"], dict(report))
    write_text(paths["html"], page)
    return paths
