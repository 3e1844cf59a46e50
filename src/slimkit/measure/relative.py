"""Measurements of a changed model as fractions of its original (the search's yardstick)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from slimkit.io import batch as B
from slimkit.measure.counts import count_flops, count_params
from slimkit.measure.latency import time_interleaved, torch_runner

Fractions = dict[str, Callable[[nn.Module], float]]


def fractions_of(base: nn.Module, keys: Sequence[str], example: tuple[torch.Tensor, ...],
                 threads: int = 1, batches: Sequence[int] | None = None) -> Fractions:
    """Per key (``flops``, ``params``, ``latency``): ``model -> measured(model) / measured(base)``.

    Counts of ``base`` are taken once. Latency (PyTorch) is timed interleaved with ``base``
    every time, so each ratio comes from one window (~0.5 s, 15..200 rounds) and machine
    load shifts both sides alike; with ``batches``, it is timed at each batch size (the
    example's rows repeated) and the slowest ratio counts.

    Example:
        >>> frac = fractions_of(net, ["flops", "latency"], (torch.randn(1, 3, 32, 32),))
        >>> frac["flops"](pruned)  # 0.5 = half the FLOPs
    """
    inputs = [B.take(example, torch.arange(b) % B.size(example)) for b in batches or []]

    def latency(m: nn.Module) -> float:
        return max(_latency_ratio(base, m, x, threads) for x in inputs or [example])

    def count(fn: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
        b = fn(base)
        return lambda m: fn(m) / b

    counters = {"flops": lambda m: float(count_flops(m, example)["flops"]),
                "params": lambda m: float(count_params(m)["params"])}
    return {k: latency if k == "latency" else count(counters[k]) for k in keys}


def _latency_ratio(base: nn.Module, m: nn.Module, x: tuple[torch.Tensor, ...],
                   threads: int) -> float:
    fns = {"base": torch_runner(base, x), "m": torch_runner(m, x)}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            for fn in fns.values():
                fn()
            pair = time.perf_counter() - start
            repeats = int(min(200, max(15, 0.5 / max(pair, 1e-6))))
            t = time_interleaved(fns, warmup=3, repeats=repeats)
    finally:
        torch.set_num_threads(prev)
    return t["m"]["median_ms"] / t["base"]["median_ms"]


__all__ = ["Fractions", "fractions_of"]
