"""Splits, calibration subsets and batches: determinism, stratification, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import (
    allocate,
    batches,
    build_bundle,
    calibration_indices,
    calibration_subset,
    load_data,
    split,
)


def test_allocate_is_exact_and_proportional():
    assert allocate(np.array([500, 300, 200]), 10).tolist() == [5, 3, 2]
    share = allocate(np.array([7, 1, 5, 3]), 9)
    assert share.sum() == 9 and (share <= [7, 1, 5, 3]).all()
    assert allocate(np.array([3, 3, 3]), 9).tolist() == [3, 3, 3]


def test_builtin_split_is_deterministic_by_seed(digits):
    again = load_data("builtin:digits", seed=0)
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_test, digits.y_test)
    other = load_data("builtin:digits", seed=1)
    assert not torch.equal(other.x_test, digits.x_test)
    assert len(other.x_test) == len(digits.x_test)


def test_split_partitions_and_stratifies(small_xy):
    x, y = map(torch.from_numpy, small_xy)
    xtr, ytr, xte, yte = split(x, y, 0.25, seed=3)
    assert len(xte) == 10 and len(xtr) == 30
    # 2.5 test samples per class: the two remainders go to the first classes (stable ties).
    assert yte.bincount().tolist() == [3, 3, 2, 2]
    assert ytr.bincount().tolist() == [7, 7, 8, 8]
    # Together train and test are exactly the original rows, each once.
    rows = torch.cat([xtr, xte])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.tolist()))
    same = split(x, y, 0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(same, (xtr, ytr, xte, yte), strict=True))
    assert not torch.equal(split(x, y, 0.25, seed=4)[2], xte)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(small_xy, fraction):
    x, y = map(torch.from_numpy, small_xy)
    with pytest.raises(DataError, match="test_fraction"):
        split(x, y, fraction, seed=0)


def test_split_needs_two_samples():
    with pytest.raises(DataError, match="at least 2"):
        split(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), 0.5, 0)


def test_split_keeps_at_least_one_sample_each_side():
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0])
    xtr, _, xte, _ = split(x, y, 0.01, seed=0)
    assert len(xte) == 1 and len(xtr) == 2
    xtr, _, xte, _ = split(x, y, 0.99, seed=0)
    assert len(xte) == 2 and len(xtr) == 1


def test_calibration_subset_deterministic_stratified_clipped(mnist):
    a = calibration_subset(mnist, 50, seed=7)
    b = calibration_subset(mnist, 50, seed=7)
    c = calibration_subset(mnist, 50, seed=8)
    assert a.shape == (50, 1, 28, 28)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # Each calibration row comes from x_train; classes are balanced (5 of each of 10).
    flat = mnist.x_train.reshape(len(mnist.x_train), -1)
    idx = [int((flat == row.reshape(1, -1)).all(dim=1).nonzero()[0]) for row in a]
    assert mnist.y_train[idx].bincount(minlength=10).tolist() == [5] * 10
    a.zero_()  # a copy: mutating it leaves the bundle intact
    assert mnist.x_train.abs().sum() > 0


def test_calibration_indices_mix_classes_from_the_first_batch(mnist):
    # The built-in training set is sorted by label: a prefix of 128 is one class. The
    # calibration indices are stratified and shuffled, so even their first 32 mix classes.
    assert mnist.y_train[:128].unique().numel() == 1
    idx = calibration_indices(mnist, 128, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == len(set(idx.tolist())) == 128
    counts = mnist.y_train[idx].bincount(minlength=10)
    assert counts.min() >= 12 and counts.max() <= 13  # 128 over 10 classes of ~400
    assert mnist.y_train[idx[:32]].unique().numel() >= 6
    torch.testing.assert_close(calibration_subset(mnist, 128, seed=0), mnist.x_train[idx],
                               rtol=0, atol=0)


def test_calibration_subset_clips_n_and_rejects_zero(small_xy):
    bundle = build_bundle("t", *small_xy, seed=0)
    assert len(calibration_subset(bundle, 10_000, seed=0)) == len(bundle.x_train)
    with pytest.raises(DataError, match="at least 1"):
        calibration_subset(bundle, 0, seed=0)


def test_batches_cover_everything_once():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    plain = list(batches(x, y, 4))
    assert [len(xb) for xb, _ in plain] == [4, 4, 2]
    assert torch.equal(torch.cat([yb for _, yb in plain]), y)
    gen = torch.Generator().manual_seed(0)
    shuffled = list(batches(x, y, 3, shuffle=True, generator=gen))
    ys = torch.cat([yb for _, yb in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and not torch.equal(ys, y)
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in shuffled)
    again = torch.cat([yb for _, yb in batches(x, y, 3, True, torch.Generator().manual_seed(0))])
    assert torch.equal(again, ys)


def test_batches_reject_bad_arguments_at_call_time():
    with pytest.raises(DataError, match="batch_size"):
        batches(torch.zeros(3, 1), torch.zeros(3), 0)
    with pytest.raises(DataError, match="3 samples but y has 2"):
        batches(torch.zeros(3, 1), torch.zeros(2), 2)
