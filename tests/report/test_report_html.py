"""report.html and report.json: content, self-containment, embedded plots, robustness, escaping."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest

from slimkit.report import plots as plots_module
from slimkit.report import render_html, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class _Tables(HTMLParser):
    """Collect every <table> as rows of cell texts, keyed by the table's class."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag in ("div", "li", "br") and self._cell is not None:
            self._cell.append(" ")  # block boundaries read as spaces, as a browser shows them

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables_of(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def row(table: list[list[str]], first: str) -> list[str]:
    """The row whose first cell is ``first``."""
    matches = [r for r in table if r and r[0] == first]
    assert len(matches) == 1, f"expected one row '{first}', found {len(matches)}"
    return matches[0]


@pytest.fixture
def stub_png(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip PNG encoding (the slow part) where a test only sweeps the data handling."""
    monkeypatch.setattr(plots_module, "_to_data_uri", lambda fig: "data:image/png;base64,")


def test_write_report_writes_json_as_is_and_html(sample_report: dict, tmp_path: Path) -> None:
    paths = write_report(sample_report, tmp_path / "run")
    assert paths == {"json": tmp_path / "run/report.json", "html": tmp_path / "run/report.html"}
    assert json.loads(paths["json"].read_text()) == sample_report
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "zoo:lenet5" in page
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave no temp files


def test_verdict_banner_shows_each_criterion(sample_page: str) -> None:
    page = sample_page
    assert 'class="banner bad"' in page
    assert "Target MISSED" in page and "2 of 3 criteria met" in page
    criteria = tables_of(page)["criteria"]
    assert row(criteria, "Accuracy drop (top-1)") == [
        "Accuracy drop (top-1)",
        "at most 1.00 pts",
        "0.40 pts",
        "beats it by 0.60 pts",
        "met",
    ]
    assert row(criteria, "Size reduction") == [
        "Size reduction",
        "at least 4.00×",
        "3.10×",
        "short by 0.90×",
        "missed",
    ]
    assert row(criteria, "Speedup (ONNX Runtime, batch 32)")[1:] == [
        "at least 1.50×",
        "1.61×",
        "beats it by 0.11×",
        "met",
    ]


def test_verdict_met_is_green(sample_report: dict, stub_png: None) -> None:
    sample_report["verdict"]["met"] = True
    for criterion in sample_report["verdict"]["criteria"]:
        criterion["met"] = True
    page = render_html(sample_report)
    assert 'class="banner ok"' in page and "Target MET" in page
    assert "Target MISSED" not in page


def test_before_after_table(sample_page: str) -> None:
    compare = tables_of(sample_page)["compare"]
    assert row(compare, "Parameters") == ["Parameters", "61,706", "49,072", "1.26× smaller"]
    assert row(compare, "Non-zero parameters")[1:] == ["61,706", "16,986", "3.63× smaller"]
    assert row(compare, "Size on disk")[1:] == [
        "249,311 B (243.5 KiB)",
        "80,412 B (78.5 KiB)",
        "3.10× smaller",
    ]
    assert row(compare, "ONNX size")[3] == "1.25× smaller"
    assert row(compare, "MACs")[1:3] == ["416,520", "344,520"]
    assert row(compare, "Top-1 accuracy")[1:] == ["99.12%", "98.72%", "-0.40 pts"]
    assert row(compare, "Top-5 accuracy")[1:] == ["99.98%", "99.96%", "-0.02 pts"]
    texts = [r[0] for r in compare]
    torch_at, ort_at = texts.index("Latency, PyTorch"), texts.index("Latency, ONNX Runtime")
    assert compare[ort_at + 3] == ["batch 32, median", "0.740 ms", "0.459 ms", "1.61× faster"]
    assert compare[torch_at + 1] == ["batch 1, median", "0.210 ms", "0.130 ms", "1.61× faster"]
    assert compare[torch_at + 2][0] == "batch 1, p90"


def test_stages_table(sample_page: str) -> None:
    stages = tables_of(sample_page)["stages"]
    assert stages[0] == [
        "#",
        "Kind",
        "What changed",
        "Skipped, and why",
        "Top-1",
        "Size",
        "Non-zero params",
        "Speed vs the model before (ONNX Runtime, 95% CI)",
        "Time",
    ]
    assert stages[1][1] == "baseline" and stages[-1][1] == "final"
    prune = row(stages, "1")
    assert prune[1].startswith("magnitude_prune")
    assert "fc1: 70% zeros" in prune[2]
    assert "conv1: excluded by user" in prune[3] and "classifier head kept dense" in prune[3]
    assert prune[4:] == ["98.72% -0.40 pts", "78.5 KiB", "16,986", "—", "41.7 s"]
    assert stages[-1][-1] == "total 44.9 s"


def test_long_change_lists_fold(sample_report: dict, stub_png: None) -> None:
    sample_report["stages"][0]["changed"] = [f"layer{i}: pruned" for i in range(20)]
    page = render_html(sample_report)
    assert "and 14 more" in page and "layer19: pruned" in page


def test_parity_fidelity_and_environment(sample_page: str) -> None:
    page = sample_page
    assert "max abs diff 1.20e-06, tolerance 1.00e-04" in page
    assert '<span class="pill ok">OK</span>' in page
    assert "top-1 agreement 99.40%" in page and "cosine 0.9991" in page
    env = tables_of(page)["kv"]
    assert row(env, "CPU") == ["CPU", "AMD EPYC 7763 64-Core Processor"]
    assert row(env, "ONNX Runtime") == ["ONNX Runtime", "1.32.0"]
    assert row(env, "Threads") == ["Threads", "2"]


def test_page_is_self_contained(sample_report: dict) -> None:
    sample_report["data"]["name"] = "https://example.com/data.csv"  # text, not a reference
    page = render_html(sample_report)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.IGNORECASE)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.IGNORECASE)
    assert "url(" not in page and "@import" not in page
    assert "default-src 'none'" in page
    assert re.findall(r"""\bsrc\s*=\s*["']([^"':]*:)""", page) == ["data:"] * 4


def test_plots_are_embedded_valid_pngs(sample_page: str) -> None:
    page = sample_page
    payloads = DATA_URI.findall(page)
    assert len(payloads) == 4
    for payload in payloads:
        data = base64.b64decode(payload, validate=True)
        assert data.startswith(PNG_MAGIC)
        image = mpimg.imread(io.BytesIO(data), format="png")
        assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 400
        assert image[..., :3].std() > 0.05  # a drawn plot, not a blank canvas
    for alt in (
        "Accuracy vs size",
        "Accuracy vs latency",
        "Parameters per layer",
        "MACs per layer",
    ):
        assert f'alt="{alt}"' in page


def test_plots_are_reproducible(sample_report: dict, sample_page: str) -> None:
    assert DATA_URI.findall(render_html(sample_report)) == DATA_URI.findall(sample_page)


def test_empty_report_renders() -> None:
    page = render_html({})
    assert "No verdict" in page and "no target was set" in page
    assert "No stage was run." in page
    assert page.count("not available") == 4
    compare = tables_of(page)["compare"]
    assert row(compare, "Parameters") == ["Parameters", "—", "—", "—"]
    medians = [r for r in compare if r[0] == "batch 1, median"]
    assert medians == [["batch 1, median", "—", "—", "—"]] * 2  # PyTorch and ONNX Runtime


def test_partial_report_renders(sample_report: dict) -> None:
    report = sample_report
    del report["verdict"], report["environment"], report["comparison"], report["parity"]
    report["baseline"]["accuracy"] = None
    report["final"]["latency"] = None
    report["final"].pop("onnx_size_bytes")
    del report["stages"][0]["measure"]
    report["stages"][1]["measure"] = {"size_bytes": 80_000}
    page = render_html(report)
    assert "No verdict" in page and "at least 4.00×" in page  # the target, still shown
    assert "parity was not checked" in page and "No environment was recorded" in page
    compare = tables_of(page)["compare"]
    assert row(compare, "Top-1 accuracy") == ["Top-1 accuracy", "—", "98.72%", "—"]
    assert row(compare, "ONNX size")[2:] == ["—", "—"]
    median = [r for r in compare if r[0] == "batch 32, median"]
    assert median and all(r[2] == "—" for r in median)
    assert "no stage has both a size and an accuracy" not in page  # final still has both
    assert "not available: no stage has both a latency and an accuracy" in page


def _drop(report: dict, path: tuple[str, ...]) -> dict:
    target: Any = report
    for key in path[:-1]:
        target = target[key]
    target.pop(path[-1])
    return report


_TOP_KEYS = [
    "slimkit_version",
    "created",
    "model",
    "data",
    "recipe",
    "target",
    "verdict",
    "baseline",
    "final",
    "stages",
    "comparison",
    "fidelity",
    "parity",
    "environment",
]
_MEASURE_KEYS = [
    "params",
    "nonzero_params",
    "size_bytes",
    "onnx_size_bytes",
    "macs",
    "flops",
    "accuracy",
    "peak_memory_bytes",
    "latency",
    "layers",
]


@pytest.mark.parametrize("key", _TOP_KEYS)
@pytest.mark.parametrize("how", ["missing", "none"])
def test_any_top_level_key_may_be_absent(
    sample_report: dict, stub_png: None, key: str, how: str
) -> None:
    if how == "missing":
        del sample_report[key]
    else:
        sample_report[key] = None
    assert "</html>" in render_html(sample_report)


@pytest.mark.parametrize("key", _MEASURE_KEYS)
def test_any_measure_key_may_be_absent(sample_report: dict, stub_png: None, key: str) -> None:
    for side in ("baseline", "final"):
        sample_report[side].pop(key)
    for stage in sample_report["stages"]:
        stage["measure"][key] = None
    assert "</html>" in render_html(sample_report)


def test_odd_types_do_not_crash(sample_report: dict) -> None:
    sample_report["stages"].append("not a stage")
    sample_report["baseline"]["accuracy"] = {"top1": "n/a", "top5": None}
    sample_report["final"]["latency"]["torch"] = {"1": None, "32": {"median_ms": float("nan")}}
    sample_report["final"]["layers"].append({"name": "extra"})
    sample_report["verdict"]["criteria"].append({"name": "custom", "asked": "yes"})
    sample_report["environment"]["gpus"] = ["none"]
    page = render_html(sample_report)
    assert "custom" in page and '["none"]' in page.replace("&#34;", '"')


def test_python_int_batch_keys(sample_report: dict, stub_png: None) -> None:
    """Before a JSON round trip, the pipeline's dicts may use int batch sizes as keys."""
    for side in ("baseline", "final"):
        latency = sample_report[side]["latency"]
        for runtime in latency:
            latency[runtime] = {int(k): v for k, v in latency[runtime].items()}
    compare = tables_of(render_html(sample_report))["compare"]
    assert ["batch 32, median", "0.740 ms", "0.459 ms", "1.61× faster"] in compare


def test_text_is_escaped(sample_report: dict, stub_png: None) -> None:
    sample_report["model"]["name"] = 'evil"<b>&'
    sample_report["stages"][0]["kind"] = "<script>"
    sample_report["stages"][0]["skipped"] = [{"what": "<img src=x>", "why": "a < b & c"}]
    sample_report["environment"]["cpu"] = "</td></tr></table><h1>x</h1>"
    page = render_html(sample_report)
    assert "&lt;script&gt;" in page and "<script" not in page
    assert "&lt;img src=x&gt;" in page and "<img src=x" not in page
    assert "a &lt; b &amp; c" in page
    assert "evil&#34;&lt;b&gt;&amp;" in page  # markupsafe writes " as &#34;
    assert "<h1>x</h1>" not in page


def test_rejects_a_non_mapping() -> None:
    with pytest.raises(TypeError, match="report dict"):
        render_html(["not", "a", "report"])  # type: ignore[arg-type]


def test_layers_table_shows_channels_sparsity_and_latency(sample_report: dict,
                                                           stub_png: None) -> None:
    import copy

    report = copy.deepcopy(sample_report)
    base = {r["name"]: r for r in report["baseline"]["layers"]}
    final = {r["name"]: r for r in report["final"]["layers"]}
    base["conv2"].update(weight_shape=[16, 6, 5, 5], latency_ms=0.5, weight_bits=32)
    final["conv2"].update(weight_shape=[8, 6, 5, 5], latency_ms=0.25, params=1208,
                          nonzero_params=302, weight_bits=32)
    report["final"]["layers"] = [r for r in report["final"]["layers"] if r["name"] != "fc3"]
    layers = tables_of(render_html(report))["layers"]
    assert layers[0] == ["Layer", "Type", "Weight shape", "Parameters", "Bits", "Sparsity",
                         "MACs", "Latency"]
    assert row(layers, "conv2") == ["conv2", "Conv2d", "16×6×5×5 → 8×6×5×5", "2,416 → 1,208",
                                    "32 → 32", "75.00%", row(layers, "conv2")[6],
                                    "0.500 ms → 0.250 ms"]
    assert row(layers, "fc1")[4] == "— → —"  # reports without bits per layer still render
    assert row(layers, "fc3")[2].endswith("removed")
