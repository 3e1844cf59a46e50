"""Deterministic, stratified splits, calibration subsets and mini-batches.

Everything here draws randomness from a private ``numpy.random.Generator`` seeded by the
caller, never from global state, so the same seed gives the same split on every run and
platform, and loading data never disturbs a user's own random streams.

The stratified pick is our own rather than scikit-learn's ``train_test_split(stratify=...)``
(which agrees with it per class up to one sample, see ``tests/data/test_idx.py``):
scikit-learn refuses a class with a single sample and a subset smaller than the number of
classes, both of which slimkit meets (a user's rare class, a small calibration set), and
using it would make scikit-learn and SciPy core dependencies and change every split the
committed benchmarks were measured on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from slimkit.core.errors import DataError
from slimkit.data.validate import MIN_CALIBRATION_SAMPLES
from slimkit.io import batch as B

if TYPE_CHECKING:
    from slimkit.data.bundle import DataBundle


def _rng(seed: int) -> np.random.Generator:
    # numpy refuses negative seeds; fold every Python int onto a valid one.
    return np.random.default_rng(seed % 2**63)


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Share ``total`` draws among classes in proportion to ``counts`` (largest remainder).

    Integer arithmetic keeps it exact: the shares sum to ``total`` and no class is
    asked for more samples than it holds (requires ``total <= counts.sum()``).

    Example:
        >>> allocate(np.array([500, 300, 200]), 10).tolist()
        [5, 3, 2]
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    scaled = counts * total
    share = scaled // n
    remainder = scaled % n
    # Ties broken by class order (stable sort) so the result is a pure function of counts.
    order = np.argsort(-remainder, kind="stable")
    share[order[: total - int(share.sum())]] += 1
    return share


def _stratified_pick(y: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``total`` samples drawn per class in proportion to class frequency."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    share = allocate(counts, total)
    picked = [rng.permutation(np.flatnonzero(inverse == c))[: share[c]]
              for c in range(len(classes))]
    return np.sort(np.concatenate(picked))


def split_indices(y: torch.Tensor, test_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test index arrays (both sorted, so original order is kept).

    The test set holds ``round(N * test_fraction)`` samples (at least one, and at least
    one sample is left for training), drawn from each class in proportion to its size.

    Raises:
        DataError: ``test_fraction`` outside (0, 1) or fewer than two samples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    n = len(y)
    if n < 2:
        raise DataError(f"cannot split {n} sample(s) into train and test; need at least 2.")
    n_test = min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)
    test = _stratified_pick(y.cpu().numpy(), n_test, _rng(seed))
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``(x, y)`` into a stratified, seed-determined train and test set.

    Args:
        x: inputs ``(N, ...)``.
        y: 1-D int labels ``(N,)``, used to keep class proportions in both halves.
        test_fraction: share of samples for the test set, in (0, 1).
        seed: same seed, same split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``.

    Raises:
        DataError: lengths differ, bad ``test_fraction``, or fewer than two samples.

    Example:
        >>> x, y = torch.randn(10, 3), torch.arange(10) % 2
        >>> [len(t) for t in split(x, y, 0.2, seed=0)]
        [8, 8, 2, 2]
    """
    if B.size(x) != len(y):
        raise DataError(f"x has {B.size(x)} samples but y has {len(y)} labels; they must match.")
    train, test = split_indices(y, test_fraction, seed)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    return B.take(x, tr), y[tr], B.take(x, te), y[te]


def hold_out_validation(bundle: DataBundle, val_fraction: float = 0.1, seed: int = 0
                        ) -> DataBundle:
    """Move a stratified, seed-determined share of ``bundle``'s training split into a
    validation split (``x_val``/``y_val``): a three-way train / validation / test split in
    which training never sees the samples that choices are made on.

    Args:
        bundle: an in-memory bundle without a validation split; changed in place.
        val_fraction: share of the training split to hold out, in (0, 1).
        seed: same seed, same split.

    Returns:
        ``bundle``, with ``meta["val_fraction"]``, ``meta["val_seed"]`` and the split sizes.

    Raises:
        DataError: a bad ``val_fraction``, or the bundle has a validation split already.

    Example:
        >>> b = hold_out_validation(load_data("builtin:fashion-mnist"), 0.1)  # doctest: +SKIP
        >>> b.n_train, b.n_val, b.n_test  # doctest: +SKIP
        (54000, 6000, 10000)
    """
    if bundle.y_val is not None:
        raise DataError(f"'{bundle.name}' has a validation split already; hold one out once.")
    train, val = split_indices(bundle.y_train, val_fraction, seed)
    tr, va = torch.from_numpy(train), torch.from_numpy(val)
    bundle.x_val, bundle.y_val = B.take(bundle.x_train, va), bundle.y_train[va]
    bundle.x_train, bundle.y_train = B.take(bundle.x_train, tr), bundle.y_train[tr]
    bundle.meta.update(val_fraction=val_fraction, val_seed=seed, n_train=bundle.n_train,
                       n_val=len(val), n_test=bundle.n_test)
    return bundle


def calibration_indices(bundle: DataBundle, n: int, seed: int = 0) -> torch.Tensor:
    """Indices into ``bundle``'s training set of a seed-determined, class-stratified sample.

    Calibration (quantization observers, activation statistics, importance scores) should see
    every class in its natural proportion; a prefix of the training set may hold a single
    class (built-in datasets come sorted by label), and stratifying keeps small subsets from
    missing classes.

    Args:
        bundle: the dataset; indices point into ``bundle.x_train`` / ``bundle.y_train``.
        n: how many samples; clipped to the training set size.
        seed: same seed, same subset.

    Returns:
        ``min(n, N_train)`` int64 indices in shuffled order, so that any prefix (a first
        calibration batch) also mixes classes.

    Raises:
        DataError: ``n`` is not positive, or the training split has fewer than
            ``MIN_CALIBRATION_SAMPLES`` samples.

    Example:
        >>> idx = calibration_indices(bundle, 128, seed=0)  # doctest: +SKIP
        >>> x, y = bundle.x_train[idx], bundle.y_train[idx]  # doctest: +SKIP
    """
    if n < 1:
        raise DataError(f"calibration subset size must be at least 1, got {n}.")
    if bundle.n_train < MIN_CALIBRATION_SAMPLES:
        raise DataError(
            f"cannot calibrate on '{bundle.name}': its training split has "
            f"{bundle.n_train} sample(s), and statistics from fewer than "
            f"{MIN_CALIBRATION_SAMPLES} describe those samples, not the data; give more data."
        )
    n = min(n, bundle.n_train)
    rng = _rng(seed)
    picked = _stratified_pick(bundle.y_train.cpu().numpy(), n, rng)
    return torch.from_numpy(rng.permutation(picked))


def calibration_subset(bundle: DataBundle, n: int, seed: int = 0) -> torch.Tensor:
    """The training inputs at :func:`calibration_indices` (a new tensor, shuffled order).

    Example:
        >>> calib = calibration_subset(bundle, 256, seed=0)  # doctest: +SKIP
    """
    if getattr(bundle, "streaming", False):
        return bundle.calibration(n, seed)
    return B.tmap(torch.clone, B.take(bundle.x_train, calibration_indices(bundle, n, seed)))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` mini-batches; the last one may be smaller.

    Args:
        x, y: inputs and labels of equal length.
        batch_size: samples per batch (>= 1).
        shuffle: visit samples in a random order drawn from ``generator``.
        generator: torch generator for the order; pass a seeded one for reproducibility.

    Raises:
        DataError: bad ``batch_size`` or lengths differ.

    Example:
        >>> [len(xb) for xb, _ in batches(torch.zeros(5, 2), torch.zeros(5), 2)]
        [2, 2, 1]
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if B.size(x) != len(y):
        raise DataError(f"x has {B.size(x)} samples but y has {len(y)} labels; they must match.")
    order = torch.randperm(B.size(x), generator=generator) if shuffle else None
    return _iterate(x, y, batch_size, order)


def _iterate(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # A separate generator so that argument errors in ``batches`` raise at call time.
    for start in range(0, B.size(x), batch_size):
        if order is None:
            yield B.take(x, slice(start, start + batch_size)), y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield B.take(x, idx), y[idx]
