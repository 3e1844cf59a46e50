"""Analytic empirical variational Bayesian matrix factorization (EVBMF), in numpy.

Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization" (JMLR 2013): for ``Y = B A^T + noise`` with
Gaussian priors whose variances are themselves estimated (empirical Bayes), the posterior keeps
exactly the singular components of ``Y`` above a threshold that depends only on the shape and
the noise variance. The noise variance is estimated by minimizing the free energy, which is a
one-dimensional problem once the singular values are known (Nakajima et al. 2015, "Condition
for perfect dimensionality recovery by variational Bayesian PCA").

Kim et al., "Compression of deep convolutional neural networks for fast and low power mobile
applications" (ICLR 2016) use the number of kept components of the mode-0 and mode-1 unfoldings
of a conv kernel as its Tucker-2 ranks; slimkit does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# tau_underbar = 2.5129 sqrt(alpha): where the EVB free energy of one component changes sign
# (Nakajima et al. 2013, Theorem 3; the constant solves an equation with no closed form).
_TAU_CONST = 2.5129
_GRID = 256


@dataclass(frozen=True)
class EVBMFResult:
    """What EVBMF found: the rank, the noise variance, the threshold and the singular values."""

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """The positive root tau of ``x = (1 + tau)(1 + alpha / tau)``."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, n_rows: int, n_cols: int, s: np.ndarray, x_bar: float) -> float:
    """EVB free energy (up to constants) as a function of the noise variance.

    Components whose scaled squared singular value ``x = s^2 / (M sigma2)`` exceeds
    ``x_bar`` are kept (positive solution); the others are pruned to zero.
    """
    alpha = n_rows / n_cols
    x = s**2 / (n_cols * sigma2)
    kept, pruned = x[x > x_bar], np.maximum(x[x <= x_bar], 1e-300)
    tau = _tau(kept, alpha)
    return float(np.sum(pruned - np.log(pruned)) + np.sum(kept - tau)
                 + np.sum(np.log((tau + 1.0) / kept)) + alpha * np.sum(np.log(tau / alpha + 1.0)))


def _minimize(fn: object, lo: float, hi: float, iters: int = 60) -> float:
    """Bounded 1-D minimization: a geometric grid, then golden-section search on the best cell.

    The free energy can have several local minima; the grid finds the best basin and the
    golden section refines it (the role Brent's method plays in the reference code).
    """
    grid = np.geomspace(lo, hi, _GRID)
    values = np.array([fn(g) for g in grid])  # type: ignore[operator]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
    phi = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = fn(c), fn(d)  # type: ignore[operator]
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = fn(c)  # type: ignore[operator]
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = fn(d)  # type: ignore[operator]
    best = min((values[i], grid[i]), (fc, c), (fd, d))
    return float(best[1])


def evbmf(y: np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Rank of ``y`` under analytic empirical VBMF (Nakajima et al. 2013).

    Args:
        y: a matrix (any orientation; it is transposed so that rows <= columns).
        sigma2: the noise variance if known; estimated by minimizing the free energy if None.

    Returns:
        An :class:`EVBMFResult`; ``rank`` counts singular values above
        ``sqrt(M sigma2 (1 + tau_) (1 + alpha / tau_))``, with ``L <= M`` the sides of ``y``,
        ``alpha = L / M`` and ``tau_ = 2.5129 sqrt(alpha)``. It can be 0 (pure noise).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> signal = rng.normal(size=(30, 4)) @ rng.normal(size=(4, 50))
        >>> y = signal + 0.1 * rng.normal(size=(30, 50))
        >>> evbmf(y).rank
        4
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    n_rows, n_cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = n_rows / n_cols
    tau_bar = _TAU_CONST * np.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    if sigma2 is None:
        upper = float(np.sum(s**2)) / (n_rows * n_cols)
        # Lower bound from Nakajima et al. (2015): at most ceil(L / (1 + alpha)) - 1 components
        # can be signal, so the remaining ones bound the noise variance from below.
        h = max(int(min(np.ceil(n_rows / (1.0 + alpha)) - 1, n_rows)) - 1, -1)
        tail = s[h + 1:]
        lower = max(float(tail[0] ** 2) / (n_cols * x_bar), float(np.mean(tail**2)) / n_cols)
        if upper <= 0.0:
            return EVBMFResult(0, 0.0, 0.0, s)
        lower = min(max(lower, upper * 1e-12), upper)
        sigma2 = upper if lower >= upper else _minimize(
            lambda v: _free_energy(v, n_rows, n_cols, s, x_bar), lower, upper)
    threshold = float(np.sqrt(n_cols * sigma2 * x_bar))
    return EVBMFResult(int(np.sum(s > threshold)), float(sigma2), threshold, s)
