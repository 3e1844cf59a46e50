"""k-means against a brute-force numpy reference; linear initialization."""

import numpy as np
import pytest

from slimkit.encode.kmeans import assign_nearest, kmeans_1d, linear_init


def reference_kmeans(x: np.ndarray, k: int, max_iter: int = 100):
    """Textbook Lloyd with a full distance matrix, from linear initialization."""
    c = np.linspace(x.min(), x.max(), k)
    labels = np.abs(x[:, None] - c[None, :]).argmin(axis=1)
    for _ in range(max_iter):
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean()
        new = np.abs(x[:, None] - c[None, :]).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return c, labels


def test_linear_init_spans_min_to_max():
    x = np.array([3.0, -1.0, 0.5, 2.0])
    np.testing.assert_allclose(linear_init(x, 5), [-1.0, 0.0, 1.0, 2.0, 3.0], rtol=0, atol=0)
    assert linear_init(x, 1).tolist() == [pytest.approx(1.125)]


@pytest.mark.parametrize("k", [2, 8, 32])
def test_kmeans_matches_reference_and_converges(k):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.normal(-0.3, 0.05, 150), rng.laplace(0.2, 0.1, 250)])
    centroids, labels, iters = kmeans_1d(x, k)
    ref_c, ref_labels = reference_kmeans(x, k)
    np.testing.assert_allclose(centroids, ref_c, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(labels, ref_labels)
    assert iters < 100  # reached a fixed point
    # Fixed point: each value's nearest centroid is its own, each centroid is its members' mean.
    np.testing.assert_array_equal(np.abs(x[:, None] - centroids).argmin(1), labels)
    for j in np.unique(labels):
        assert centroids[j] == pytest.approx(x[labels == j].mean(), abs=1e-12)
    assert np.all(np.diff(centroids) >= 0)


def test_assign_nearest_and_degenerate_inputs():
    c = np.array([-1.0, 0.0, 2.0])
    assert assign_nearest(np.array([-0.6, -0.5, 0.9, 1.1, 5.0]), c).tolist() == [0, 0, 1, 2, 2]
    centroids, labels, _ = kmeans_1d(np.array([0.25, 0.25, 0.25]), 4)
    assert set(centroids[labels]) == {0.25}
    with pytest.raises(ValueError, match="needs values"):
        kmeans_1d(np.array([]), 4)
