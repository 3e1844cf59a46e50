"""Two runs side by side: ``slimkit compare RUN_A RUN_B``.

Every number comes from the runs' own ``report.json``. Latencies in two reports were timed
in two processes, so their ratio is not an interleaved measurement: the table marks it so,
and :func:`time_runs` re-times both ONNX files interleaved, in one process, with a
confidence interval, when the user asks for a judgement (``--time``).

Example:
    >>> a, b = load_run(Path("runs/prune")), load_run(Path("runs/quant"))  # doctest: +SKIP
    >>> [r["name"] for r in compare_runs(a, b)["rows"]][:2]  # doctest: +SKIP
    ['params', 'non-zero params']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimkit.core.errors import ConfigError

#: (row name, key in a measurement, which direction is better)
_SIZES = (("params", "params", "lower"), ("non-zero params", "nonzero_params", "lower"),
          ("bits / parameter", "bits_per_param", "lower"),
          ("artifact bytes", "size_bytes", "lower"), ("ONNX bytes", "onnx_size_bytes", "lower"),
          ("MACs / sample", "macs", "lower"), ("peak memory bytes", "peak_memory_bytes", "lower"))
_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "error")


def load_run(path: Path) -> dict[str, Any]:
    """A run's ``report.json``, given the run directory or the file itself.

    Raises:
        ConfigError: the path is missing, or not a slimkit report.
    """
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"'{path}' holds no report.json; give a directory written by "
                          "slimkit compress (or its report.json)")
    try:
        report = json.loads(file.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{file}' is not readable JSON ({exc}); is it a slimkit report?"
                          ) from exc
    missing = [k for k in ("model", "baseline", "final") if not isinstance(report, dict)
               or k not in report]
    if missing:
        raise ConfigError(f"'{file}' is not a slimkit report (no {', '.join(missing)}); give "
                          "the report.json written by slimkit compress")
    report["_path"] = str(path)
    return report


def _row(name: str, a: float | None, b: float | None, better: str) -> dict[str, Any]:
    ratio = b / a if a and b is not None else None
    if a is None or b is None or a == b:
        winner = "same" if a == b and a is not None else None
    else:
        winner = "B" if (b < a) == (better == "lower") else "A"
    return {"name": name, "a": a, "b": b, "ratio_b_to_a": ratio, "better": better,
            "winner": winner}


def _metrics(measure: dict[str, Any]) -> dict[str, float]:
    """Quality numbers of one measurement: task metrics, else top-1/top-5 accuracy."""
    found = measure.get("metrics") or measure.get("accuracy") or {}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


def _latencies(measure: dict[str, Any]) -> dict[tuple[str, str], float]:
    out = {}
    for runtime, by_batch in (measure.get("latency") or {}).items():
        for batch, stats in (by_batch or {}).items():
            if isinstance(stats, dict) and "median_ms" in stats:
                out[(runtime, batch)] = float(stats["median_ms"])
    return out


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows comparing the final models of runs ``a`` and ``b`` (see :func:`load_run`).

    Returns:
        ``{"a", "b": {"path", "model", "stages", "target_met"}, "rows": [...], "notes": [...]}``;
        a row holds both values, ``b / a`` and which run is better (``None`` when unknown).
    """
    fa, fb = a["final"], b["final"]
    rows = [_row(name, fa.get(key), fb.get(key), better) for name, key, better in _SIZES
            if fa.get(key) is not None or fb.get(key) is not None]
    ma, mb = _metrics(fa), _metrics(fb)
    for key in sorted(set(ma) | set(mb)):
        better = "lower" if any(w in key.lower() for w in _LOWER_IS_BETTER) else "higher"
        rows.append(_row(key, ma.get(key), mb.get(key), better))
    la, lb = _latencies(fa), _latencies(fb)
    for runtime, batch in sorted(set(la) | set(lb)):
        rows.append(_row(f"latency {runtime} b={batch} (ms, separate runs)",
                         la.get((runtime, batch)), lb.get((runtime, batch)), "lower"))
    notes = []
    if a["model"].get("name") != b["model"].get("name"):
        notes.append(f"different models: {a['model'].get('name')} vs {b['model'].get('name')}")
    if (a.get("data") or {}).get("name") != (b.get("data") or {}).get("name"):
        notes.append("different data: quality numbers are not comparable")
    if la or lb:
        notes.append("latencies were timed in two processes, not interleaved: use --time for "
                     "a measured ratio with a confidence interval")
    return {"a": _side(a), "b": _side(b), "rows": rows, "notes": notes}


def _side(report: dict[str, Any]) -> dict[str, Any]:
    stages = [s.get("kind") for s in (report.get("recipe") or {}).get("stages", [])]
    verdict = report.get("verdict") or {}
    return {"path": report.get("_path"), "model": report["model"].get("name"), "stages": stages,
            "target_met": verdict.get("met") if verdict.get("criteria") else None}


def time_runs(a: dict[str, Any], b: dict[str, Any], batch: int = 32, threads: int = 1,
              repeats: int = 30, warmup: int = 3) -> dict[str, Any]:
    """Time both runs' ONNX files in ONNX Runtime, interleaved in this process.

    Returns:
        ``{"batch", "threads", "a_ms", "b_ms", "ratio_b_to_a", "ci", "verdict"}``: the median
        of paired per-round ratios with its ~95% interval; ``"no difference"`` when the
        interval holds 1.

    Raises:
        ConfigError: a run has no ``model.onnx``, or the two runs take different inputs.
    """
    import torch

    from slimkit.io.model import TensorSpec
    from slimkit.io.onnx_model import ort_session
    from slimkit.measure.latency import ort_runner, ratio_ci, time_interleaved

    specs = [_inputs(r) for r in (a, b)]
    if specs[0] != specs[1]:
        raise ConfigError(f"'{a['_path']}' and '{b['_path']}' take different inputs, so they "
                          "cannot be timed on the same batch")
    paths = [Path(r["_path"]) / "model.onnx" for r in (a, b)]
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"'{p}' is missing: --time needs each run's ONNX export "
                              "(rerun compress without --no-onnx)")
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(TensorSpec.from_json(s).example(batch, gen) for s in specs[0])
    named = dict(zip([s["name"] for s in specs[0]], inputs, strict=True))
    fns = {k: ort_runner(ort_session(p, threads), named) for k, p in zip("ab", paths,
                                                                          strict=True)}
    timed = time_interleaved(fns, warmup, repeats, keep_samples=True)
    ratio, low, high = ratio_ci(timed["b"]["samples_ms"], timed["a"]["samples_ms"])
    verdict = ("no difference" if low <= 1 <= high
               else f"B {1 / ratio:.2f}x faster" if ratio < 1 else f"B {ratio:.2f}x slower")
    return {"batch": batch, "threads": threads, "repeats": repeats,
            "a_ms": timed["a"]["median_ms"], "b_ms": timed["b"]["median_ms"],
            "ratio_b_to_a": ratio, "ci": [low, high], "verdict": verdict}


def _inputs(report: dict[str, Any]) -> list[dict[str, Any]]:
    model = report["model"]
    if model.get("inputs"):
        return model["inputs"]
    return [{"name": "input", "shape": model["input_shape"], "dtype": model["input_dtype"],
             "dynamic": {}, "high": None}]
