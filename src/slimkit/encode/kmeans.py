"""One-dimensional k-means (Lloyd) with the initializations compared by Han et al. (2016).

Pure numpy functions on a vector of weights. In one dimension the clusters of a Lloyd step are
intervals between the midpoints of consecutive centroids, so the assignment is a
``searchsorted`` on the midpoints instead of a distance matrix: O(n log k) memory-free.
"""

from __future__ import annotations

import numpy as np


def linear_init(values: np.ndarray, k: int) -> np.ndarray:
    """``k`` centroids evenly spaced between ``min(values)`` and ``max(values)``.

    Han et al. found linear initialization best: unlike density-based or random
    initialization it keeps centroids on the rare large weights, which matter most.

    Args:
        values: 1-D array (at least one element).
        k: number of centroids (>= 1).

    Returns:
        float64 array of shape ``(k,)``, ascending.
    """
    values = np.asarray(values, dtype=np.float64)
    if k == 1:
        return np.array([values.mean()])
    return np.linspace(values.min(), values.max(), k)


def assign_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value (ties go to the lower centroid).

    Args:
        values: 1-D array.
        centroids: 1-D array, ascending.

    Returns:
        int64 labels in ``[0, len(centroids))``.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    if len(centroids) == 1:
        return np.zeros(len(values), dtype=np.int64)
    mids = (centroids[:-1] + centroids[1:]) / 2
    return np.searchsorted(mids, np.asarray(values, dtype=np.float64), side="left").astype(
        np.int64)


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = 100,
              init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Lloyd's algorithm on a vector, from linear initialization unless ``init`` is given.

    Alternates assignment to the nearest centroid and moving each centroid to the mean of its
    members, until no label changes (a fixed point) or ``max_iter`` steps. A centroid without
    members keeps its place; in 1-D that keeps the centroids ascending.

    Args:
        values: 1-D array with at least one element.
        k: number of clusters.
        max_iter: most Lloyd iterations.
        init: starting centroids (ascending), default :func:`linear_init`.

    Returns:
        ``(centroids float64 (k,), labels int64, iterations run)``.

    Raises:
        ValueError: ``values`` is empty or ``k < 1``.

    Example:
        >>> c, labels, _ = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.1]), 2)
        >>> c.round(2).tolist(), labels.tolist()
        ([0.05, 1.05], [0, 0, 1, 1])
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or k < 1:
        raise ValueError(f"kmeans_1d needs values and k >= 1 (got {values.size} values, k={k})")
    centroids = linear_init(values, k) if init is None else np.array(init, dtype=np.float64)
    labels = assign_nearest(values, centroids)
    for it in range(1, max_iter + 1):
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values, minlength=k)
        filled = counts > 0
        centroids = centroids.copy()
        centroids[filled] = sums[filled] / counts[filled]
        new = assign_nearest(values, centroids)
        if np.array_equal(new, labels):
            return centroids, labels, it
        labels = new
    return centroids, labels, max_iter
