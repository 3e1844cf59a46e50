"""The HTML pages come from jinja2 templates: text from a report is escaped (autoescape), a
value a template needs and the view lacks fails loudly (StrictUndefined), the markup that is
trusted (matplotlib's SVG) stays markup, and the templates ship with the package."""

from __future__ import annotations

import fnmatch
import html
import re
import tomllib
from pathlib import Path

import jinja2
import pytest
from tests.report.test_report_html import row, tables_of

from slimkit.report import plots as plots_module
from slimkit.report import render_html
from slimkit.report.exits import early_exit_section
from slimkit.report.render import environment, render
from slimkit.search.report import render as render_search

EVIL = "<script>alert(1)</script>"
ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "src/slimkit/report/templates"


@pytest.fixture
def stub_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots_module, "_to_data_uri", lambda fig: "data:image/png;base64,")


def test_a_script_in_a_layer_name_is_escaped(sample_report: dict, stub_png: None) -> None:
    for side in ("baseline", "final"):
        sample_report[side]["layers"][2]["name"] = EVIL  # fc1
    sample_report["stages"][0]["changed"] = [f"{EVIL}: 400 -> 300 inputs"]
    sample_report["stages"][0]["skipped"] = [{"what": EVIL, "why": EVIL}]
    page = render_html(sample_report)
    assert "<script" not in page.lower()
    assert f"<code>{html.escape(EVIL, quote=False)}</code>" in page
    # the browser reads back the name as text, with the layer's own numbers beside it
    layers = tables_of(page)["layers"]
    assert row(layers, EVIL)[1:4] == ["Linear", "— → —", "48,120 → 36,090"]
    assert f"{EVIL}: {EVIL}" in row(tables_of(page)["stages"], "0")[3]


def test_escaping_holds_in_the_early_exit_section_and_the_search_page() -> None:
    details = {"thresholds": [0.9], "exits": [{"block": EVIL}],
               "val": {"exit_fraction": [0.6, 0.4], "exit_top1": [0.99, 0.9], "top1": 0.95,
                       "static_top1": 0.96}}
    section = early_exit_section({"stages": [{"kind": "early_exit", "details": details}]})
    assert "<script" not in section and "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in section
    assert "<td>60.00%</td><td>99.00%</td>" in section
    trial = {"number": 0, "state": "COMPLETE", "feasible": True, "params": {EVIL: 0.5},
             "measured": {"metric": 0.9, "time_ratio": 0.5, "size_share": 0.4,
                          "flops_share": 0.3}}
    page = render_search({
        "metric": EVIL, "higher_is_better": True, "seconds": 3.0, "objectives": ["metric"],
        "latency": {"runtime": "onnxruntime", "batch": 8}, "trials": [trial],
        "front": [trial], "chosen": {**trial, "label": EVIL, "why": "best", "met": True},
        "hand": {}, "baseline": {"metrics": {EVIL: 0.95}}})
    # the plots are matplotlib's SVG, kept as markup; every text from the result is escaped
    assert page.count("<svg") == 2 and "<script" not in page
    assert "<tr><td>0</td><td>0.9000</td><td>0.500</td><td>0.400</td><td>0.300</td><td>yes" in page
    assert f"Chosen: {html.escape(EVIL)}, best;" in page


def test_a_value_the_template_lacks_fails_loudly() -> None:
    with pytest.raises(jinja2.UndefinedError, match="facts"):
        render("header.html.j2", header={"name": "lenet5"})
    assert render("header.html.j2", header={"name": "a&b", "facts": ["x", "<y>"]}) == (
        '<header><h1>Compression report: a&amp;b</h1><p class="meta">x · &lt;y&gt;</p>'
        "</header>\n")


def test_every_template_compiles_and_autoescapes() -> None:
    env = environment()
    names = sorted(p.name for p in TEMPLATES.iterdir())
    assert names and env.list_templates() == names
    for name in names:
        assert name.endswith(".html.j2") and env.get_template(name)
        assert env.autoescape(name) is True  # select_autoescape over the .html.j2 suffix


def test_the_templates_ship_in_the_wheel() -> None:
    """Every template matches the package-data globs of pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["slimkit"]
    for path in TEMPLATES.iterdir():
        relative = path.relative_to(ROOT / "src/slimkit").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative


def test_the_page_keeps_the_whitespace_of_its_text(sample_page: str) -> None:
    """Template line breaks fall between tags only: the texts read as before."""
    assert '<p id="parity"><strong>Parity.</strong> ONNX Runtime vs PyTorch (final model): ' \
           'max abs diff 1.20e-06, tolerance 1.00e-04 <span class="pill ok">OK</span></p>' \
        in sample_page
    assert re.search(r"<td>[^<]*\n", sample_page) is None
