"""The jinja2 environment of the HTML pages: templates in ``report/templates``, autoescaped.

Python prepares the data (numbers formatted as text, tone classes, plot data URIs); the
templates hold every tag. Autoescaping is on for every template, so text from a report (a
layer or model name, a skip reason) can never become markup; ``StrictUndefined`` makes a
value a template asks for and the view lacks an error rather than an empty string. jinja2
is imported on first use, so importing slimkit stays cheap.

Example:
    >>> from slimkit.report.render import render
    >>> render("plots.html.j2", plots=[])
    '<section id="plots"><h2>Plots</h2><div class="plots"></div></section>\\n'
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment (built once): package templates, autoescape, strict."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("slimkit", "report/templates"),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=True, default=True
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (under ``report/templates``) with ``context``."""
    return environment().get_template(name).render(**context)
