"""The compression report: ``report.json`` and a self-contained ``report.html`` with plots.

Example:
    >>> from slimkit.report import write_report
    >>> paths = write_report(report, Path("runs/lenet5"))  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['html', 'json']
"""

from slimkit.report.page import render_html, write_report

__all__ = ["render_html", "write_report"]
