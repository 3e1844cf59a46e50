"""Observers against direct float64 computations on the full data, and bounded memory."""

import math

import pytest
import torch

from slimkit.core.errors import ConfigError, DataError
from slimkit.quant.observers import (
    CALIBRATORS,
    EntropyObserver,
    HistogramObserver,
    MseObserver,
    PercentileObserver,
    kl_threshold,
    make_observer,
    quant_error,
)


def _stream(n_batches: int, seed: int = 0, scale_growth: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Batches whose range keeps growing force the histogram to widen many times.
    return [torch.randn(4, 256, generator=g) * (1 + (i if scale_growth else 0) * 0.1)
            for i in range(n_batches)]


def test_minmax_per_tensor_and_per_channel_match_reduction():
    data = _stream(7)
    full = torch.cat(data).double()
    obs = make_observer("minmax", "x")
    ch = make_observer("minmax", "w", granularity="channel:1")
    for b in data:
        obs.update(b)
        ch.update(b)
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(float(full.min())) and float(hi) == float(full.max())
    torch.testing.assert_close(ch.range()[1].flatten().double(), full.amax(0))


def test_histogram_widening_is_exact_at_bin_resolution():
    data = _stream(20)
    obs = HistogramObserver("x", bins=512)
    for b in data:
        obs.update(b)
    full = torch.cat(data).double().flatten()
    edges = obs.edges()
    ref = torch.histogram(full, bins=edges).hist
    assert obs.hist.sum() == full.numel()
    torch.testing.assert_close(obs.hist, ref, rtol=0, atol=0)


@pytest.mark.parametrize("pct", [99.0, 99.99])
def test_percentile_within_one_bin(pct):
    data = _stream(30, seed=1)
    obs = PercentileObserver("x", percentile=pct)
    for b in data:
        obs.update(b)
    full = torch.cat(data).double().flatten()
    lo, hi = obs.range()
    ref_hi = float(torch.quantile(full, pct / 100))
    ref_lo = float(torch.quantile(full, 1 - pct / 100))
    assert abs(float(hi) - ref_hi) <= 1.01 * obs.width
    assert abs(float(lo) - ref_lo) <= 1.01 * obs.width


def test_mse_choice_matches_brute_force_on_raw_data():
    g = torch.Generator().manual_seed(2)
    data = [torch.relu(torch.randn(1024, generator=g)) ** 2 for _ in range(8)]  # heavy tail
    obs = MseObserver("x", steps=32, bits=4, symmetric=False, signed=False)
    for b in data:
        obs.update(b)
    full = torch.cat(data).double()
    lo, hi = obs.candidates()
    brute = quant_error(full, torch.ones_like(full), lo, hi, 4, False, False, False)
    got_lo, got_hi = obs.range()
    chosen = quant_error(full, torch.ones_like(full), got_lo.double().reshape(1),
                         got_hi.double().reshape(1), 4, False, False, False)
    assert float(chosen) <= 1.05 * float(brute.min())
    assert float(got_hi) < float(full.max())  # the tail is clipped
    minmax = quant_error(full, torch.ones_like(full), torch.zeros(1, dtype=torch.float64),
                         full.max().reshape(1), 4, False, False, False)
    assert float(chosen) < float(minmax)


def test_entropy_matches_reference_kl_on_numpy_histogram():
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(2048, generator=g) for _ in range(4)]
    data[0][0] = 40.0  # an outlier the KL threshold must cut
    obs = EntropyObserver("x", stride=1, bins=1024, bits=8, symmetric=True, signed=True)
    for b in data:
        obs.update(b)
    lo, hi = obs.range()
    full = torch.cat(data).double()
    # Reference: the same KL search on a histogram of |x| made directly from the full data.
    amax = float(full.abs().max())
    ref_hist = torch.histc(full.abs(), bins=1024, min=0, max=amax)
    ref_t = kl_threshold(ref_hist, 128) * amax / 1024
    assert float(hi) == pytest.approx(ref_t, rel=0.05)
    assert 2.0 < float(hi) < 10.0
    assert float(lo) == pytest.approx(max(-float(hi), float(full.min())))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_memory_is_constant_in_the_number_of_batches(method):
    sizes = []
    for n in (1, 50):
        obs = make_observer(method, "x")
        for b in _stream(n):
            obs.update(b)
        obs.range()
        sizes.append(sum(t.numel() for t in obs.state_tensors()))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_data_gives_a_valid_floored_scale(method, value):
    from slimkit.quant.primitives import choose_qparams

    obs = make_observer(method, "conv1")
    obs.update(torch.full((8, 16), value))
    lo, hi = obs.range()
    scale, zero = choose_qparams(lo, hi, 8, symmetric=False, signed=False)
    assert torch.isfinite(scale).all() and float(scale) > 0
    assert 0 <= int(zero) <= 255


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_data_names_the_layer(bad):
    obs = make_observer("percentile", "features.3")
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(DataError, match="features.3"):
        obs.update(x)


def test_no_data_and_unknown_method():
    with pytest.raises(DataError, match="saw no data"):
        make_observer("minmax", "fc").range()
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentil", "fc")
    assert {"minmax", "percentile", "mse", "entropy"} <= set(CALIBRATORS.names())
