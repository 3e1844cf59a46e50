"""Latency in PyTorch eager and ONNX Runtime, timed with interleaved runs.

Machines are noisy, so models that are compared are timed in one process, round-robin
(A, B, A, B, ... with the order rotated each round), and judged by ratios of medians.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.progress import step
from slimkit.io import batch as B
from slimkit.io.model import set_mode
from slimkit.io.onnx_model import ort_session


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], warmup: int = 3, repeats: int = 20,
    keep_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time each zero-argument callable ``repeats`` times, interleaved round-robin.

    Args:
        keep_samples: also return every round's time (``samples_ms``; sample ``r`` of every
            name comes from the same round, so they pair up, see :func:`ratio_ci`).

    Returns:
        ``{name: {"median_ms", "p90_ms", "mean_ms", "repeats"[, "samples_ms"]}}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        n: {
            "median_ms": statistics.median(s),
            "p90_ms": percentile(s, 90),
            "mean_ms": statistics.fmean(s),
            "repeats": len(s),
            **({"samples_ms": s} if keep_samples else {}),
        }
        for n, s in samples.items()
    }


def ratio_ci(new: Sequence[float], old: Sequence[float], z: float = 1.96,
             ) -> tuple[float, float, float]:
    """The median of the paired ratios ``new[r] / old[r]`` (one pair per interleaved round)
    and a distribution-free ~95% confidence interval for it.

    The interval is given by order statistics: the median of ``n`` ratios lies between the
    ``j``-th and ``k``-th smallest with ``j, k = (n -/+ z sqrt(n)) / 2`` (binomial normal
    approximation), so no assumption on the shape of the timing noise is needed.

    Returns:
        ``(median ratio, low, high)``; ``> 1`` means ``new`` is slower.

    Example:
        >>> ratio_ci([2.0] * 30, [1.0] * 30)
        (2.0, 2.0, 2.0)
    """
    ratios = sorted(a / b for a, b in zip(new, old, strict=True))
    n = len(ratios)
    j = math.floor((n - z * math.sqrt(n)) / 2)
    k = math.ceil(1 + (n + z * math.sqrt(n)) / 2)
    return (statistics.median(ratios), ratios[max(j - 1, 0)], ratios[min(k - 1, n - 1)])


def torch_runner(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    """A zero-argument call of ``model`` in eval + inference mode."""
    set_mode(model, False)

    def run() -> Any:
        with torch.inference_mode():
            return B.call(model, inputs)

    return run


def ort_runner(session: Any, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    """A zero-argument ONNX Runtime call on ``inputs``."""
    given = dict(zip(B.names(inputs), B.leaves(inputs), strict=True))
    feed = {i.name: (given[i.name] if i.name in given else B.leaves(inputs)[k]).numpy()
            for k, i in enumerate(session.get_inputs())}
    return lambda: session.run(None, feed)


def compare_latency(
    models: Mapping[str, tuple[nn.Module, str | Path | None]],
    example_batch: Sequence[torch.Tensor],
    batch_sizes: Sequence[int] = (1, 32),
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    progress: bool = False,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Latency of several models, in torch eager and (when an ONNX path is given) ONNX Runtime.

    Args:
        models: name -> (PyTorch model, path of its ONNX export or None).
        example_batch: inputs with at least ``max(batch_sizes)`` rows (repeated if fewer).
        batch_sizes: batch sizes to time.
        threads: intra-op threads for both runtimes (fixed, and recorded in the result).
        progress: show progress past a few seconds (one unit per runtime and batch size; see
            :mod:`slimkit.core.progress`).
        keep_samples: keep every round's time per model (see :func:`time_interleaved`).

    Returns:
        ``{"threads", "torch": {batch: {name: stats}}, "onnxruntime": {...}}``.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sessions = {n: ort_session(p, threads) for n, (_, p) in models.items() if p is not None}
        result: dict[str, Any] = {"threads": threads, "torch": {}, "onnxruntime": {}}
        total = len(batch_sizes) * (2 if sessions else 1)
        with step(f"timing {len(models)} models", total=total, unit="timings",
                  enabled=progress) as bar:
            for b in batch_sizes:
                inputs = B.tmap(lambda t, b=b: _take(t, b), example_batch)
                fns = {n: torch_runner(m, inputs) for n, (m, _) in models.items()}
                result["torch"][str(b)] = time_interleaved(fns, warmup, repeats, keep_samples)
                bar.advance(batch=b)
                if sessions:
                    fns = {n: ort_runner(s, inputs) for n, s in sessions.items()}
                    result["onnxruntime"][str(b)] = time_interleaved(fns, warmup, repeats,
                                                                     keep_samples)
                    bar.advance(batch=b)
        return result
    finally:
        torch.set_num_threads(prev_threads)


def _take(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] >= batch:
        return t[:batch].contiguous()
    reps = (batch + t.shape[0] - 1) // t.shape[0]
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous()


def layer_latency(model: nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str],
                  repeats: int = 10, warmup: int = 2) -> dict[str, float | None]:
    """Median wall time (ms) of each named submodule's forward, timed inside whole forwards.

    Forward pre/post hooks time each call of the named modules while the whole model runs in
    PyTorch eager, ``repeats`` times, at the current thread setting. A module that isn't
    called as a module (for example a Linear whose weight a wrapper uses directly) gets None.
    """
    modules = dict(model.named_modules())
    samples: dict[str, list[float]] = {n: [] for n in names}
    starts: dict[str, float] = {}
    handles = []
    for name in names:
        mod = modules[name]

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            starts[name] = time.perf_counter()

        def post(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
            samples[name].append((time.perf_counter() - starts.pop(name)) * 1e3)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    run = torch_runner(model, inputs)
    try:
        for _ in range(warmup):
            run()
        for s in samples.values():
            s.clear()
        for _ in range(repeats):
            run()
    finally:
        for h in handles:
            h.remove()
    # A module called k times per forward holds k consecutive samples per repeat: report the
    # median over repeats of their sum.
    out: dict[str, float | None] = {}
    for n, s in samples.items():
        k = len(s) // repeats
        out[n] = (statistics.median(sum(s[i * k:(i + 1) * k]) for i in range(repeats))
                  if k else None)
    return out


def ort_node_times(path: str | Path, inputs: Sequence[torch.Tensor], threads: int = 1,
                   repeats: int = 10, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Median time (ms) of every node ONNX Runtime runs, from its own profiler.

    The session has the options every timing here uses (:func:`~slimkit.io.onnx_model.
    ort_options`: all graph optimizations), so the nodes are the kernels ORT chose (fused,
    QLinear...) and their names keep the PyTorch scope they came from (``/fc1/Gemm``).

    Returns:
        ``{node name: {"ms": median over the repeats, "op": its operator}}``.
    """
    import json
    import tempfile

    import onnxruntime as ort

    from slimkit.io.onnx_model import ort_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        run = ort_runner(session, inputs)
        for _ in range(warmup + repeats):
            run()
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            durations.setdefault(name, []).append(e["dur"] / 1e3)  # microseconds -> ms
            ops[name] = e.get("args", {}).get("op_name", "")
    return {n: {"ms": statistics.median(d[-repeats:]), "op": ops[n]}
            for n, d in durations.items()}


def node_layer(node: str, layers: Sequence[str] | set[str]) -> str:
    """The layer an ONNX node computes for: the deepest module path in its scope name
    (``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``) found in ``layers``, else its
    scope as a path (``/pool1/MaxPool`` -> ``pool1``); a node without scope (a layout
    change ORT inserted) is named by itself."""
    comps = [c for c in node.split("/") if c][:-1]
    if not comps:
        return f"({node}: added by ONNX Runtime)"
    for k in range(len(comps), 0, -1):
        if ".".join(comps[:k]) in layers:
            return ".".join(comps[:k])
        dotted = next((j for j in range(k - 1, -1, -1) if "." in comps[j]), None)
        if dotted is not None and ".".join(comps[dotted:k]) in layers:
            return ".".join(comps[dotted:k])
    return ".".join(comps)


def ort_layer_times(path: str | Path, inputs: Sequence[torch.Tensor], layers: Sequence[str],
                    threads: int = 1, repeats: int = 10) -> dict[str, float]:
    """Median ONNX Runtime time (ms) per layer: its nodes' times summed (see
    :func:`ort_node_times` and :func:`node_layer`)."""
    known = set(layers)
    out: dict[str, float] = {}
    for node, t in ort_node_times(path, inputs, threads, repeats).items():
        layer = node_layer(node, known)
        out[layer] = out.get(layer, 0.0) + t["ms"]
    return out


def layer_growth(before: Mapping[str, float], after: Mapping[str, float], top: int = 5,
                 ) -> list[dict[str, Any]]:
    """The layers whose time grew most from ``before`` to ``after`` (a layer absent before
    was added: all its time is growth), largest first, at most ``top``.

    Example:
        >>> layer_growth({"fc1": 1.0, "fc2": 2.0}, {"fc1": 3.0, "fc2": 1.0, "new": 0.5})
        [{'layer': 'fc1', 'before_ms': 1.0, 'after_ms': 3.0, 'added_ms': 2.0}, \
{'layer': 'new', 'before_ms': 0.0, 'after_ms': 0.5, 'added_ms': 0.5}]
    """
    rows = [{"layer": k, "before_ms": before.get(k, 0.0), "after_ms": v,
             "added_ms": v - before.get(k, 0.0)} for k, v in after.items()]
    rows = [r for r in rows if r["added_ms"] > 0]
    return sorted(rows, key=lambda r: -r["added_ms"])[:top]
