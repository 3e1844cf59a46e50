"""A realistic report dict, shaped like the pipeline's output for LeNet-5 on MNIST."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

_LAYERS = (  # name, type, params, macs
    ("conv1", "Conv2d", 156, 117_600),
    ("conv2", "Conv2d", 2_416, 240_000),
    ("fc1", "Linear", 48_120, 48_000),
    ("fc2", "Linear", 10_164, 10_080),
    ("fc3", "Linear", 850, 840),
)


def _layers(keep: dict[str, float], density: dict[str, float]) -> list[dict[str, Any]]:
    """Per-layer rows after keeping a fraction of params (structured) and of non-zeros."""
    rows = []
    for name, kind, params, macs in _LAYERS:
        kept = round(params * keep.get(name, 1.0))
        rows.append(
            {
                "name": name,
                "type": kind,
                "params": kept,
                "nonzero_params": round(kept * density.get(name, 1.0)),
                "macs": round(macs * keep.get(name, 1.0)),
            }
        )
    return rows


def _measure(layers: list[dict[str, Any]], top1: float, top5: float, size: int) -> dict:
    return {
        "params": sum(r["params"] for r in layers),
        "nonzero_params": sum(r["nonzero_params"] for r in layers),
        "size_bytes": size,
        # the ONNX file stores dense float32 weights: zeros still take space
        "onnx_size_bytes": 4 * sum(r["params"] for r in layers) + 2_600,
        "macs": sum(r["macs"] for r in layers),
        "flops": 2 * sum(r["macs"] for r in layers),
        "accuracy": {"top1": top1, "top5": top5},
        "peak_memory_bytes": 3_145_728,
        "layers": layers,
    }


def _latency(scale: float) -> dict[str, Any]:
    return {
        "torch": {
            "1": {"median_ms": 0.21 * scale, "p90_ms": 0.26 * scale},
            "32": {"median_ms": 1.9 * scale, "p90_ms": 2.2 * scale},
        },
        "onnxruntime": {
            "1": {"median_ms": 0.048 * scale, "p90_ms": 0.061 * scale},
            "32": {"median_ms": 0.74 * scale, "p90_ms": 0.83 * scale},
        },
    }


def _verdict() -> dict[str, Any]:
    """Accuracy and speed met, size missed: the overall target is missed."""
    return {
        "met": False,
        "criteria": [
            {"name": "max_accuracy_drop", "asked": 1.0, "achieved": 0.4, "met": True,
             "margin": 0.6, "unit": "points"},
            {"name": "min_size_ratio", "asked": 4.0, "achieved": 3.1, "met": False,
             "margin": -0.9, "unit": "x"},
            {"name": "min_speedup", "asked": 1.5, "achieved": 1.61, "met": True,
             "margin": 0.11, "unit": "x", "runtime": "onnxruntime", "batch": 32},
        ],
    }  # fmt: skip


def _stages(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    """Channel pruning, then unstructured magnitude pruning, with their measures."""
    return [
        {
            "index": 0,
            "kind": "channel_prune",
            "seconds": 3.2,
            "changed": ["conv2: 16 -> 12 output channels", "fc1: 400 -> 300 inputs"],
            "skipped": [{"what": "fc3", "why": "excluded by user"}],
            "details": {"criterion": "l1", "ratio": 0.25},
            "measure": first,
        },
        {
            "index": 1,
            "kind": "magnitude_prune",
            "seconds": 41.7,
            "changed": ["conv2: 60% zeros", "fc1: 70% zeros", "fc2: 60% zeros"],
            "skipped": [
                {"what": "conv1", "why": "excluded by user"},
                {"what": "fc3", "why": "classifier head kept dense"},
            ],
            "details": {"sparsity": 0.6, "schedule": "one-shot"},
            "measure": second,
        },
    ]


def _comparison(baseline: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    speed = {
        rt: {
            b: {
                "baseline_ms": baseline["latency"][rt][b]["median_ms"],
                "final_ms": final["latency"][rt][b]["median_ms"],
                "speedup": 1 / 0.62,
            }
            for b in ("1", "32")
        }
        for rt in ("torch", "onnxruntime")
    }
    return {"batch_sizes": [1, 32], **speed, "size_ratio": 3.1, "onnx_size_ratio": 1.25}


_ENVIRONMENT = {
    "cpu": "AMD EPYC 7763 64-Core Processor",
    "threads": 2,
    "python": "3.11.7",
    "torch": "2.13.0",
    "onnxruntime": "1.32.0",
    "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
}


def make_sample_report() -> dict[str, Any]:
    """Baseline, two stages (channel pruning, then unstructured magnitude pruning), final."""
    baseline = _measure(_layers({}, {}), 0.9912, 0.9998, 249_311)
    baseline["latency"] = _latency(1.0)
    shrunk = {"conv2": 0.75, "fc1": 0.75}
    stage0 = _measure(_layers(shrunk, {}), 0.9901, 0.9998, 189_935)
    sparse = _layers(shrunk, {"fc1": 0.3, "fc2": 0.4, "conv2": 0.6})
    stage1 = _measure(sparse, 0.9872, 0.9996, 80_412)
    final = copy.deepcopy(stage1)
    final["latency"] = _latency(0.62)
    return {
        "slimkit_version": "0.1.0",
        "created": "2026-11-23T10:00:00Z",
        "model": {"name": "zoo:lenet5", "input_shape": [1, 28, 28]},
        "data": {"name": "builtin:mnist", "n_train": 4000, "n_test": 1000},
        "recipe": {
            "stages": [
                {"kind": "channel_prune", "ratio": 0.25, "exclude": ["fc3"]},
                {"kind": "magnitude_prune", "sparsity": 0.6, "exclude": ["fc3", "conv1"]},
            ],
            "finetune": {"epochs": 2, "lr": 0.001},
        },
        "target": {
            "max_accuracy_drop": 1.0,
            "min_size_ratio": 4.0,
            "min_speedup": {"value": 1.5, "runtime": "onnxruntime", "batch": 32},
        },
        "verdict": _verdict(),
        "baseline": baseline,
        "final": final,
        "stages": _stages(stage0, stage1),
        "comparison": _comparison(baseline, final),
        "fidelity": {"cosine": 0.9991, "max_abs_diff": 0.0123, "top1_agreement": 0.994},
        "parity": {"max_abs_diff": 1.2e-6, "ok": True, "atol": 1e-4},
        "environment": dict(_ENVIRONMENT),
    }


@pytest.fixture
def sample_report() -> dict[str, Any]:
    """A fresh copy of the realistic sample report for each test."""
    return make_sample_report()


@pytest.fixture(scope="session")
def sample_page() -> str:
    """The sample report rendered once, plots included (rendering takes about a second)."""
    from slimkit.report import render_html

    return render_html(make_sample_report())


@pytest.fixture(scope="session")
def sample_html_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample report written to disk with ``write_report``; returns report.html."""
    from slimkit.report import write_report

    return write_report(make_sample_report(), tmp_path_factory.mktemp("report"))["html"]
