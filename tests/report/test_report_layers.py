"""The report after quantization and factorization (issue 18): parameters unchanged by
quantization, bits per layer, and every transformed layer lined up under its baseline name in
the layers table and the per-layer plots (no spurious 'removed' rows)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.report.test_report_html import row, tables_of
from torch import nn

from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel
from slimkit.lowrank import LowRankConfig, lowrank
from slimkit.measure import measure_static
from slimkit.quant import PtqConfig, WeightOnlyConfig, ptq, weight_only_quant
from slimkit.report import plots as plots_module
from slimkit.report import render_html
from slimkit.report.layers import layer_pairs

NAMES = ["0", "2", "5", "7"]
TYPES = {"0": "Conv2d", "2": "Conv2d", "5": "Linear", "7": "Linear"}


@pytest.fixture
def stub_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots_module, "_to_data_uri", lambda fig: "data:image/png;base64,")


@pytest.fixture(scope="module")
def float_model() -> SlimModel:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    return SlimModel(module=net.eval(), input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def baseline(float_model: SlimModel, digits: DataBundle) -> dict:
    return measure_static(float_model, digits, layers=True)


def _report(sample: dict, baseline: dict, final: dict) -> dict[str, Any]:
    """The sample report with measured baseline and final counts and layers."""
    for side, measure in (("baseline", baseline), ("final", final)):
        sample[side].update({k: v for k, v in measure.items() if k != "accuracy"})
    sample["stages"] = []
    return sample


def _quantized(kind: str, model: SlimModel, data: DataBundle) -> SlimModel:
    if kind == "ptq":
        cfg = PtqConfig(num_samples=128, min_conv_reduction=0, reduce_range=False)
        return ptq(model, cfg, StageContext(data=data))[0]
    cfg = WeightOnlyConfig(bits=4, group_size=32, layer_types=["Linear", "Conv"],
                           calib_samples=64)
    return weight_only_quant(model, cfg, StageContext(data=data))[0]


@pytest.mark.parametrize(("kind", "bits", "new_type"),
                         [("ptq", "8", "QuantLayer"), ("weight_only", "4", None)])
def test_quantized_report_lines_up_every_layer(kind: str, bits: str, new_type: str | None,
                                               float_model: SlimModel, digits: DataBundle,
                                               baseline: dict, sample_report: dict,
                                               stub_png: None) -> None:
    final = measure_static(_quantized(kind, float_model, digits), digits, layers=True)
    report = _report(sample_report, baseline, final)
    tables = tables_of(render_html(report))
    layers = tables["layers"]
    assert [r[0] for r in layers[1:]] == NAMES
    base = {r["name"]: r for r in baseline["layers"]}
    for name in NAMES:
        cells = row(layers, name)
        assert "removed" not in " ".join(cells)
        params = f"{base[name]['params']:,}"
        assert cells[3:5] == [f"{params} → {params}", f"32 → {bits}"]
        assert cells[1].startswith(f"{TYPES[name]} → {new_type or 'Packed'}")
        shape = "×".join(map(str, base[name]["weight_shape"]))
        assert cells[2] == f"{shape} → {shape}"
    compare = tables["compare"]
    assert row(compare, "Parameters")[1:] == [f"{final['params']:,}"] * 2 + ["unchanged"]
    bits_row = row(compare, "Bits per parameter")
    assert bits_row[1] == "32" and bits_row[2].startswith(bits + ".")
    assert bits_row[3] == f"{32 / final['bits_per_param']:.2f}× smaller"
    for key in ("params", "macs"):  # the per-layer charts keep their after-bars
        rows = plots_module._layer_rows(report["baseline"], report["final"], key)
        assert [r[0] for r in rows] == NAMES
        assert all(r[1] == r[2] and r[2] > 0 for r in rows)


def test_factorized_layer_is_one_row_under_its_name(float_model: SlimModel,
                                                    digits: DataBundle, baseline: dict,
                                                    sample_report: dict,
                                                    stub_png: None) -> None:
    cfg = LowRankConfig(rank="ratio", ratio=0.3, include=["5"])
    small = lowrank(float_model, cfg, StageContext(data=digits))[0]
    final = measure_static(small, digits, layers=True)
    parts = {r["name"]: r for r in final["layers"] if r["name"].startswith("5.")}
    assert sorted(parts) == ["5.0", "5.1"]
    report = _report(sample_report, baseline, final)
    layers = tables_of(render_html(report))["layers"]
    assert [r[0] for r in layers[1:]] == NAMES
    cells = row(layers, "5")
    rank = parts["5.0"]["weight_shape"][0]
    assert cells[1] == "Linear → Linear + Linear"
    assert cells[2] == f"64×2048 → {rank}×2048 + 64×{rank}"
    total = parts["5.0"]["params"] + parts["5.1"]["params"]
    assert total == rank * 2048 + 64 * rank + 64 < 64 * 2048 + 64
    assert cells[3] == f"{64 * 2048 + 64:,} → {total:,}"
    macs = parts["5.0"]["macs"] + parts["5.1"]["macs"]
    assert cells[6] == f"{base_macs(baseline, '5'):,} → {macs:,}"
    rows = plots_module._layer_rows(report["baseline"], report["final"], "params")
    assert ("5", 64 * 2048 + 64.0, float(total), float(total)) in rows


def base_macs(measure: dict, name: str) -> int:
    return next(r["macs"] for r in measure["layers"] if r["name"] == name)


def test_layer_pairs_folds_only_replacements() -> None:
    base = [{"name": "conv", "params": 10, "weight_bits": 32},
            {"name": "attn", "params": 40}, {"name": "attn.out", "params": 5},
            {"name": "gone", "params": 3}]
    final = [
        # a report written before wrapped layers were measured as one unit
        {"name": "conv.layer", "params": 10, "weight_bits": 8, "latency_ms": None},
        {"name": "attn", "params": 0}, {"name": "attn.q", "params": 30},
        {"name": "attn.out", "params": 5},
        {"name": "new", "params": 7},
    ]
    pairs = {n: (b, f) for n, b, f in layer_pairs(base, final)}
    assert list(pairs) == ["conv", "attn", "attn.out", "gone", "new"]
    conv = pairs["conv"][1]
    assert (conv["params"], conv["weight_bits"], conv["latency_ms"]) == (10, 8, None)
    assert pairs["attn"][1]["params"] == 30 and pairs["attn"][1]["parts"] == ["attn", "attn.q"]
    assert pairs["attn.out"][1] is final[3]  # a layer kept as it was stays as it was
    assert pairs["gone"][1] is None and pairs["new"][0] is None
    mixed = layer_pairs([{"name": "a"}], [{"name": "a.0", "params": 3, "weight_bits": 8},
                                          {"name": "a.1", "params": 1, "weight_bits": 32}])
    assert mixed[0][2]["weight_bits"] == pytest.approx(14.0)  # weighted by parameters
    assert layer_pairs(None, "odd") == []
