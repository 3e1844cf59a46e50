"""Structured pruning of zoo models to half their FLOPs: what the analysis costs, what it buys.

For resnet56, mobilenetv2 and vit on (3, 32, 32) inputs (random weights: accuracy is measured
by benchmarks/structured_prune.py, side by side with torch-pruning), ``structured_prune`` with
``target={"flops": 0.5}`` (l2 criterion, global allocation, round_to 8 for the CNNs) is timed
(graph capture + analysis, planning with the measured-FLOPs search, slicing), and the pruned
model is compared with the original: parameters, FLOPs, ONNX parity, and latency ratios
original/pruned in PyTorch eager and ONNX Runtime (batch 1 and 32, one thread, interleaved
runs in one process). Each speed-up is the median of the per-round ratios of ``--repeats``
interleaved rounds with its distribution-free 95% interval
(``slimkit.measure.latency.ratio_ci``); a single-run ratio is not a claim. Prints JSON and
saves benchmarks/results/structured_speed.json (not with ``--no-save``, for smoke runs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit, pinned  # noqa: I001

from slimkit.core.files import write_json
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.graph.dependency import analyze
from slimkit.io.loader import load_zoo
from slimkit.measure import compare_latency
from slimkit.measure.latency import ratio_ci
from slimkit.prune.structured import StructuredPruneConfig, structured_prune

RESULTS = Path(__file__).parent / "results" / "structured_speed.json"
MODELS = {"resnet56": {}, "mobilenetv2": {}, "vit": {"patch_size": 4}}


def bench(name: str, kwargs: dict[str, Any], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = load_zoo(name, input_shape=(3, 32, 32), num_classes=10, **kwargs)
    model.module.eval()
    x = model.example_inputs(1)
    start = time.perf_counter()
    report = analyze(model.module, x)
    t_analyze = time.perf_counter() - start
    cfg = StructuredPruneConfig(target={"flops": 0.5}, round_to=1 if name == "vit" else 8)
    start = time.perf_counter()
    out, rec = structured_prune(pinned(model, x), cfg)  # traced at batch 1, as before
    small = out.module
    t_prune = time.perf_counter() - start
    pruned = model.copy(small)
    pruned.arch = None
    batch = model.example_inputs(32, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"original": export_onnx(model, Path(tmp) / "o.onnx"),
                 "pruned": export_onnx(pruned, Path(tmp) / "p.onnx")}
        parity = check_parity(pruned, paths["pruned"], model.example_inputs(8, seed=2))
        lat = compare_latency({"original": (model.module, paths["original"]),
                               "pruned": (small, paths["pruned"])}, batch,
                              batch_sizes=(1, 32), threads=1, warmup=3, repeats=repeats,
                              keep_samples=True)
    speedup = {rt: {b: _speedup(lat[rt][b]) for b in lat[rt]} for rt in ("torch", "onnxruntime")}
    return {
        "prunable_groups": len(report["prunable"]),
        "unprunable_groups": len(report["unprunable"]),
        "unsupported_ops": report["unsupported"],
        "analyze_seconds": t_analyze,
        "prune_seconds": t_prune,
        "target": {k: rec.details["target"][k] for k in ("asked", "achieved", "reached")},
        "params": rec.details["params"],
        "params_ratio": rec.details["params"]["after"] / rec.details["params"]["before"],
        "flops": rec.details["flops"],
        "flops_ratio": rec.details["flops"]["after"] / rec.details["flops"]["before"],
        "onnx_parity_max_abs_diff": parity["max_abs_diff"],
        "speedup_original_over_pruned": {rt: {b: v["median"] for b, v in by.items()}
                                         for rt, by in speedup.items()},
        "speedup_ci95": {rt: {b: v["ci95"] for b, v in by.items()} for rt, by in speedup.items()},
        "faster_beyond_noise": {rt: {b: v["ci95"][0] > 1 for b, v in by.items()}
                                for rt, by in speedup.items()},
        "timing": {"rounds": repeats, "threads": 1, "interval": "order-statistic ~95% CI of "
                   "the median of the per-round ratios original/pruned (interleaved rounds)"},
        "median_ms": {rt: {b: {k: v["median_ms"] for k, v in lat[rt][b].items()}
                           for b in lat[rt]} for rt in ("torch", "onnxruntime")},
    }


def _speedup(by_model: dict[str, Any]) -> dict[str, Any]:
    """original / pruned: the median of the per-round ratios of interleaved runs and its
    distribution-free 95% interval (> 1: the pruned model is faster)."""
    med, lo, hi = ratio_ci(by_model["original"]["samples_ms"], by_model["pruned"]["samples_ms"])
    return {"median": med, "ci95": [lo, hi]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"benchmark": "structured_speed",
              "models": {n: bench(n, MODELS[n], args.repeats) for n in args.models}}
    if not args.no_save:
        write_json(RESULTS, result)
    emit(result)


if __name__ == "__main__":
    main()
