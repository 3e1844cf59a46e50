"""What the exits save: MACs per path, the exit distribution and per-exit top-1, the
operating points as thresholds sweep, and batch-1 latency in ONNX Runtime against the static
model (interleaved, with a confidence interval)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.exit import calibrate as C
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel
from slimkit.io import batch as B
from slimkit.measure.counts import count_flops
from slimkit.measure.latency import percentile, ratio_ci


def path_macs(model: EarlyExitModel, x1: B.Inputs) -> list[int]:
    """MACs of one sample leaving at each exit (segments and heads run so far), then of one
    running to the final head (every segment and every head)."""
    segments = model.segments()
    seg_macs, head_macs = [], []
    state: Any = None
    for k, seg in enumerate(segments[:-1]):
        args = x1 if k == 0 else tuple(state)
        seg_macs.append(count_flops(seg.module, args)["macs"])
        with torch.no_grad():
            state, feat = B.call(seg.module, args)
        head_macs.append(count_flops(model.heads[k], (feat,))["macs"])
    seg_macs.append(count_flops(segments[-1].module, tuple(state))["macs"])
    costs = [sum(seg_macs[:k + 1]) + sum(head_macs[:k + 1]) for k in range(len(head_macs))]
    return [*costs, sum(seg_macs) + sum(head_macs)]


def measure_exits(model: EarlyExitModel, static: nn.Module, val: C.ExitStats,
                  data: DataBundle, cfg: EarlyExitConfig, x: B.Inputs,
                  spec: Any = None) -> dict[str, Any]:
    """The stage's measurements: on the validation split (where thresholds were chosen) and,
    with ``cfg.report_split == "test"``, on the test split, read once, after every choice.
    ``spec``: the SlimModel holding ``model`` (its named inputs, for the ONNX timing)."""
    x1 = B.take(x, slice(0, 1))
    macs = path_macs(model, x1)
    static_macs = count_flops(static, x1)["macs"]
    thresholds = model.thresholds
    val_summary = C.summarize(val, thresholds, macs)
    out: dict[str, Any] = {
        "val": val_summary,
        "costs": {"path_macs": macs, "static_macs": static_macs,
                  "mean_macs_ratio_val": val_summary["mean_cost"] / max(static_macs, 1)}}
    # A stage's view of the data (the runner's) hides the test split: measure on val only.
    split = "val" if cfg.report_split != "test" or getattr(data, "test_hidden", False) \
        else "test"
    test = None
    if split == "test":
        test = C.gather(model, data.batches("test"))
        out["test"] = C.summarize(test, thresholds, macs)
        out["costs"]["mean_macs_ratio_test"] = out["test"]["mean_cost"] / max(static_macs, 1)
    out["sweep"] = C.sweep(val, test, macs, min_fraction=cfg.min_exit_fraction,
                           level=cfg.margin_level())
    out["sweep_split"] = split
    if cfg.latency_samples and cfg.report_split == "test":
        from slimkit.io.model import SlimModel

        x_lat = data.head(split, cfg.latency_samples)[0]
        if spec is None:
            spec = SlimModel(module=model, input_shape=tuple(B.leaves(x)[0].shape[1:]),
                             input_dtype=str(B.leaves(x)[0].dtype).removeprefix("torch."))
        out["latency"] = {**onnx_latency(spec, static, x_lat), "split": split}
        _latency_sweep(out)
    return out


def _latency_sweep(out: dict[str, Any]) -> None:
    """Each operating point's mean latency, estimated from the measured mean latency of
    each path (the exits' and the final head's) weighted by its exit distribution."""
    per_path = out["latency"].get("path_mean_ms")
    if not per_path:
        return
    for point in out["sweep"]:
        # A path no timed sample took has no latency: the estimate is then unknown.
        pairs = list(zip(point["exit_fraction"], per_path, strict=True))
        point["mean_ms_estimate"] = (None if any(f > 0 and ms is None for f, ms in pairs)
                                     else sum(f * ms for f, ms in pairs if ms is not None))


def onnx_latency(model: Any, static: nn.Module, x: B.Inputs, rounds: int = 7,
                 threads: int = 1) -> dict[str, Any]:
    """Batch-1 latency of the exported early exit (:class:`~slimkit.exit.runner.EarlyExitRunner`,
    which runs ``early_exit.onnx``, the steps under ``If`` nodes, for a batch of one) against
    the static model in ONNX Runtime, sample by sample, the two interleaved (their order
    alternating) over ``rounds`` rounds.

    Returns mean and p90 over samples (each sample's median over rounds) of both, the time
    ratio (early exit / static) of the round means with a 95% interval, and each path's mean.
    """
    from slimkit.exit.onnx import export_exit_onnx
    from slimkit.exit.runner import EarlyExitRunner
    from slimkit.export.onnx import export_onnx
    from slimkit.io.onnx_model import ort_session

    n = B.size(x)
    with tempfile.TemporaryDirectory() as tmp:
        export_exit_onnx(model, Path(tmp) / "chain")
        export_onnx(model.copy(static), Path(tmp) / "static.onnx")
        runner = EarlyExitRunner(Path(tmp) / "chain", threads)
        session = ort_session(Path(tmp) / "static.onnx", threads)
        names = [i.name for i in session.get_inputs()]
        feeds = [dict(zip(names, (t.numpy() for t in B.leaves(B.take(x, slice(i, i + 1)))),
                          strict=True)) for i in range(n)]
        fns = {"static": lambda f: session.run(None, f), "dynamic": lambda f: runner.run(f)}
        for f in feeds[:3]:  # warm-up
            fns["static"](f)
            fns["dynamic"](f)
        times: dict[str, list[list[float]]] = {"static": [], "dynamic": []}
        for r in range(rounds):
            row = {"static": [], "dynamic": []}
            for f in feeds:
                for name in (("static", "dynamic") if r % 2 == 0 else ("dynamic", "static")):
                    start = time.perf_counter()
                    fns[name](f)
                    row[name].append((time.perf_counter() - start) * 1e3)
            for name in row:
                times[name].append(row[name])
        exits = [int(runner.run(f)[1][0]) for f in feeds]
    return _latency_summary(times, exits, len(runner.sessions))


def _latency_summary(times: dict[str, list[list[float]]], exits: list[int],
                     paths: int) -> dict[str, Any]:
    per_sample = {k: [statistics.median(col) for col in zip(*v, strict=True)]
                  for k, v in times.items()}
    round_means = {k: [statistics.fmean(row) for row in v] for k, v in times.items()}
    ratio, lo, hi = ratio_ci(round_means["dynamic"], round_means["static"])
    path_mean = [statistics.fmean([t for t, e in zip(per_sample["dynamic"], exits, strict=True)
                                   if e == k]) if k in exits else None for k in range(paths)]
    return {"samples": len(exits), "rounds": len(times["static"]),
            "static_mean_ms": statistics.fmean(per_sample["static"]),
            "static_p90_ms": percentile(per_sample["static"], 90),
            "mean_ms": statistics.fmean(per_sample["dynamic"]),
            "p90_ms": percentile(per_sample["dynamic"], 90),
            "time_ratio": ratio, "time_ratio_ci95": [lo, hi], "speedup": 1 / ratio,
            "path_mean_ms": path_mean, "runtime": "onnxruntime", "batch": 1}
