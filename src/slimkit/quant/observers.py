"""Calibration observers: streaming, bounded-memory statistics that choose a quantization range.

Every observer sees activations one batch at a time (``update``) and holds a fixed amount of
state however many batches it sees: a running min/max, plus, for the clipping methods, a
histogram of ``bins`` counts whose range grows by merging whole bins (old bins map exactly into
the wider ones, so no count is ever smeared). ``range()`` then returns the ``(min, max)`` to
quantize with, shaped like :func:`slimkit.quant.primitives.reduce_range`.

Methods (the ``CALIBRATORS`` registry):

- ``minmax``: the observed extremes (per tensor or per channel);
- ``percentile``: clip at the ``percentile``-th / ``100 - percentile``-th value;
- ``mse``: the clipping range minimizing the quantization mean squared error of the data;
- ``entropy``: the threshold minimizing the KL divergence between the data's distribution and
  its quantized version (TensorRT's INT8 calibrator, Migacz 2017).
"""

from __future__ import annotations

import math

import torch

from slimkit.core.errors import DataError
from slimkit.core.registry import Registry
from slimkit.quant.primitives import Granularity, choose_qparams, qrange, reduce_range

CALIBRATORS: Registry[type] = Registry("calibration method")


class Observer:
    """Running min/max of a tensor stream (the base of every calibration method).

    Args:
        name: the layer (or tensor) observed, named in errors.
        bits, symmetric, signed, narrow: the quantizer the range is for (clipping methods
            evaluate the error of exactly that quantizer).
        granularity: ``tensor`` or ``channel[:AXIS]`` (min/max only).
    """

    def __init__(self, name: str = "tensor", bits: int = 8, symmetric: bool = False,
                 signed: bool = False, narrow: bool = False,
                 granularity: str | Granularity = "tensor") -> None:
        self.name = name
        self.bits, self.symmetric, self.signed, self.narrow = bits, symmetric, signed, narrow
        self.granularity = Granularity.parse(granularity)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.batches = 0

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if x.numel() == 0:
            raise DataError(f"calibration: layer '{self.name}' received an empty tensor")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"calibration: {bad} NaN/Inf values reach layer '{self.name}'; "
                            "clean the calibration data or fix the model before quantizing")
        return x

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running statistics.

        Raises:
            DataError: ``x`` is empty or holds NaN/Inf (naming the layer).
        """
        x = self._check(x)
        lo, hi = reduce_range(x.float(), self.granularity)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` to quantize with.

        Raises:
            DataError: no batch was observed.
        """
        if self.min_val is None:
            raise DataError(f"calibration: layer '{self.name}' saw no data (is it reached by "
                            "the model's forward pass?)")
        return self.min_val, self.max_val

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors this observer holds (their total size is independent of the data)."""
        return [t for t in (self.min_val, self.max_val) if t is not None]


CALIBRATORS.register("minmax", Observer)


class HistogramObserver(Observer):
    """Min/max plus a ``bins``-bin histogram over a range that only ever widens.

    The histogram covers ``[lo, lo + bins * width]``. When a batch falls outside, the range
    widens to ``lo' = lo - a * width`` and ``width' = k * width`` for integers ``a, k``: every
    old bin then lies inside exactly one new bin, so merging is exact at bin resolution.
    """

    def __init__(self, name: str = "tensor", bins: int = 2048, **kwargs) -> None:
        super().__init__(name, **{**kwargs, "granularity": "tensor"})
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.lo = 0.0
        self.width = 0.0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        x = x.detach().double().flatten()
        xmin, xmax = float(x.min()), float(x.max())
        if self.width == 0.0:
            span = xmax - xmin
            self.lo = xmin
            self.width = (span if span > 0 else max(abs(xmin), 1.0) * 1e-6) / self.bins
        elif xmin < self.lo or xmax > self.lo + self.bins * self.width:
            self._widen(xmin, xmax)
        idx = ((x - self.lo) / self.width).floor().clamp(0, self.bins - 1).long()
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    def _widen(self, xmin: float, xmax: float) -> None:
        a = max(0, math.ceil((self.lo - xmin) / self.width))
        lo = self.lo - a * self.width
        top = max(xmax, self.lo + self.bins * self.width)
        k = max(1, math.ceil((top - lo) / (self.bins * self.width) * (1 + 1e-12)))
        new = torch.zeros_like(self.hist)
        target = (torch.arange(self.bins) + a) // k
        new.index_add_(0, target, self.hist)
        self.hist, self.lo, self.width = new, lo, self.width * k

    def centers(self) -> torch.Tensor:
        return self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width

    def edges(self) -> torch.Tensor:
        return self.lo + torch.arange(self.bins + 1, dtype=torch.float64) * self.width

    def state_tensors(self) -> list[torch.Tensor]:
        return [*super().state_tensors(), self.hist]

    def _shaped(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo_t = torch.tensor(max(lo, float(self.min_val))).reshape(self.min_val.shape)
        hi_t = torch.tensor(min(hi, float(self.max_val))).reshape(self.max_val.shape)
        return lo_t.float(), hi_t.float()


@CALIBRATORS.register("percentile")
class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile``-th value (and the ``100 - percentile``-th below).

    Resolution: one histogram bin (the bin edge where the cumulative count crosses).
    """

    def __init__(self, name: str = "tensor", percentile: float = 99.99, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        edges = self.edges()
        q = self.percentile / 100.0
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)))
        return self._shaped(float(edges[lo_bin]), float(edges[min(hi_bin + 1, self.bins)]))


def quant_error(values: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                bits: int, symmetric: bool, signed: bool, narrow: bool) -> torch.Tensor:
    """Weighted mean squared quantization error of ``values`` for each candidate range.

    Args:
        values: ``(N,)`` points (histogram bin centers or raw data), float64.
        weights: ``(N,)`` their counts.
        lo, hi: ``(C,)`` candidate ranges.

    Returns:
        ``(C,)`` errors, computed in float64 with the same qparams the quantizer would use.
    """
    qmin, qmax = qrange(bits, signed, narrow)
    scale, zero = choose_qparams(lo, hi, bits, symmetric, signed, narrow)
    s, z = scale.double()[:, None], zero.double()[:, None]
    q = torch.clamp(torch.round(values[None] / s) + z, qmin, qmax)
    err = ((q - z) * s - values[None]) ** 2
    return (err * weights[None]).sum(1) / weights.sum()


@CALIBRATORS.register("mse")
class MseObserver(HistogramObserver):
    """The clipping range with the smallest quantization MSE over the histogram.

    Candidates shrink the observed range towards zero: ``[f_lo * min, f_hi * max]`` for
    ``steps`` fractions each (a grid search; a symmetric quantizer only needs ``f_lo = f_hi``).
    """

    def __init__(self, name: str = "tensor", steps: int = 64, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.steps = steps

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lo, hi)`` candidate ranges searched (also used by brute-force tests)."""
        f = torch.linspace(1.0 / self.steps, 1.0, self.steps, dtype=torch.float64)
        mn, mx = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        if self.symmetric:
            return mn * f, mx * f
        fl, fh = torch.meshgrid(f, f, indexing="ij")
        return (mn * fl).flatten(), (mx * fh).flatten()

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        lo, hi = self.candidates()
        used = self.hist > 0  # empty bins add no error
        centers, counts = self.centers()[used], self.hist[used]
        err = torch.cat([quant_error(centers, counts, lo[i:i + 256], hi[i:i + 256],
                                     self.bits, self.symmetric, self.signed, self.narrow)
                         for i in range(0, len(lo), 256)])
        best = int(torch.argmin(err))
        return self._shaped(float(lo[best]), float(hi[best]))


def kl_threshold(hist: torch.Tensor, levels: int, start: int | None = None,
                 stride: int = 1) -> int:
    """TensorRT's entropy calibration: the bin count ``i`` minimizing ``KL(P_i || Q_i)``.

    ``P_i`` is the histogram of ``|x|`` cut at bin ``i`` with the clipped mass added to its last
    bin; ``Q_i`` squeezes ``P_i`` into ``levels`` buckets and spreads each bucket evenly over its
    non-empty bins.

    Args:
        hist: ``(B,)`` counts of ``|x|`` from 0 upwards.
        levels: quantization levels on that side (128 for int8).

    Returns:
        The number of bins to keep (threshold = that many bin widths).
    """
    hist = hist.double()
    bins = len(hist)
    best, best_kl = bins, math.inf
    for i in range(start or levels, bins + 1, stride):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        raw = hist[:i]
        idx = torch.arange(i) * levels // i  # bucket of each bin
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, raw)
        nonzero = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, (raw > 0).double())
        q = torch.where(raw > 0, sums[idx] / nonzero[idx].clamp(min=1), 0.0)
        p, q = p / p.sum(), q / max(float(q.sum()), 1e-30)
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())
        if kl < best_kl:
            best, best_kl = i, kl
    return best


@CALIBRATORS.register("entropy")
class EntropyObserver(HistogramObserver):
    """Symmetric threshold ``T`` minimizing the KL divergence (TensorRT); range ``[-T, T]``
    intersected with the observed range (so a ReLU output keeps its zero lower end)."""

    def __init__(self, name: str = "tensor", stride: int = 8, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.stride = stride

    def abs_hist(self) -> tuple[torch.Tensor, float]:
        """The histogram of ``|x|`` over ``[0, max|x|]`` in ``bins`` bins, from this one."""
        amax = max(abs(float(self.min_val)), abs(float(self.max_val)), 1e-12)
        width = amax / self.bins
        idx = (self.centers().abs() / width).floor().clamp(0, self.bins - 1).long()
        out = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
        return out, width

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        qmin, qmax = qrange(self.bits, self.signed, self.narrow)
        one_sided = float(self.min_val) >= 0 or float(self.max_val) <= 0
        levels = (qmax - qmin + 1) // (1 if one_sided and not self.symmetric else 2)
        hist, width = self.abs_hist()
        keep = kl_threshold(hist, min(levels, self.bins), stride=self.stride)
        t = keep * width
        return self._shaped(-t, t)


def make_observer(method: str, name: str, **kwargs) -> Observer:
    """Build the registered observer ``method`` for the tensor ``name``.

    Raises:
        ConfigError: unknown method (listing the known ones).
    """
    return CALIBRATORS.get(method)(name, **kwargs)
