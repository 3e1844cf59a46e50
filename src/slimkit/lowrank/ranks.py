"""Rank rules: how the rank of each layer is chosen (energy, ratio, VBMF, sensitivity).

Every rule is a function ``RankRequest -> RankChoice`` registered in ``RANK_RULES`` under the
name a config's ``rank`` field uses. A rule may answer "no rank" with a reason (sensitivity
finds no rank within the size limit); the planner then leaves the layer dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from slimkit.core.errors import ConfigError
from slimkit.core.registry import Registry
from slimkit.lowrank.base import Factorizer, dense_params
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.vbmf import evbmf


@dataclass
class RankRequest:
    """What a rank rule may look at.

    Attributes:
        name: the layer's name (for messages).
        factorizer: the scheme the rank is for.
        weight: the dense weight, numpy float64.
        cfg: the lowrank config (energy, ratio, tolerance, margin).
        output_error: ``rank -> relative output error`` on the calibration batch, when one
            was given (needed by ``sensitivity``).
    """

    name: str
    factorizer: Factorizer
    weight: np.ndarray
    cfg: LowRankConfig
    output_error: Callable[[list[int]], float] | None = None

    @property
    def limit(self) -> float:
        """The never-larger rule: factors must hold fewer weights than this."""
        return dense_params(self.weight.shape) * (1.0 - self.cfg.margin)

    def allowed(self, rank: list[int]) -> bool:
        return self.factorizer.weight_params(self.weight.shape, rank) < self.limit


@dataclass
class RankChoice:
    """A rule's answer: the rank (None: leave the layer dense) and how it was found."""

    rank: list[int] | None
    note: str


RankRule = Callable[[RankRequest], RankChoice]
RANK_RULES: Registry[RankRule] = Registry("rank rule")


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest r with ``sum(s[:r]^2) >= energy * sum(s^2)`` (at least 1)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if cum[-1] <= 0:
        return 1
    r = int(np.searchsorted(cum / cum[-1], energy - 1e-12)) + 1
    return min(max(r, 1), len(s))


@RANK_RULES.register("energy")
def _energy(req: RankRequest) -> RankChoice:
    """Keep a fraction of the spectral energy of each unfolding (the PCA energy criterion)."""
    per = [energy_rank(np.linalg.svd(m, compute_uv=False), req.cfg.energy)
           for m in req.factorizer.unfoldings(req.weight)]
    return RankChoice(req.factorizer.rank_from_unfoldings(per),
                      f"energy {req.cfg.energy:g} kept (unfolding ranks {per})")


@RANK_RULES.register("ratio")
def _ratio(req: RankRequest) -> RankChoice:
    """The largest rank whose factors hold at most ``ratio`` x the dense weights."""
    shape, fac = req.weight.shape, req.factorizer
    target = req.cfg.ratio * dense_params(shape)
    fits = [c for c in fac.candidates(shape) if fac.weight_params(shape, c) <= target]
    if not fits:
        smallest = fac.candidates(shape)[0]
        return RankChoice(smallest, f"even rank {smallest} keeps more than ratio "
                                    f"{req.cfg.ratio:g} of the weights")
    return RankChoice(fits[-1], f"largest rank keeping <= {req.cfg.ratio:g} of the weights")


@RANK_RULES.register("vbmf")
def _vbmf(req: RankRequest) -> RankChoice:
    """EVBMF on each unfolding (Kim et al. 2016); a rank of 0 is raised to 1."""
    found = [evbmf(m) for m in req.factorizer.unfoldings(req.weight)]
    per = [max(1, f.rank) for f in found]
    sig = ", ".join(f"{f.sigma2:.3g}" for f in found)
    return RankChoice(req.factorizer.rank_from_unfoldings(per),
                      f"EVBMF ranks {[f.rank for f in found]} (noise variance {sig})")


@RANK_RULES.register("sensitivity")
def _sensitivity(req: RankRequest) -> RankChoice:
    """Smallest allowed rank whose relative output error is at most ``tolerance``.

    Binary search over the candidate ranks, assuming the error falls as the rank grows
    (true for SVD, nearly so for the iterative decompositions).

    Raises:
        ConfigError: no calibration batch was given.
    """
    if req.output_error is None:
        raise ConfigError(f"lowrank: rank 'sensitivity' needs a calibration batch to measure "
                          f"the output error of '{req.name}'; give data (or calib_x)")
    allowed = [c for c in req.factorizer.candidates(req.weight.shape) if req.allowed(c)]
    if not allowed:
        return RankChoice(None, "no rank is small enough for the never-larger rule")
    tol, errors = req.cfg.tolerance, {}

    def err(i: int) -> float:
        if i not in errors:
            errors[i] = req.output_error(allowed[i])
        return errors[i]

    if err(len(allowed) - 1) > tol:
        return RankChoice(None, f"relative output error {err(len(allowed) - 1):.3g} at the "
                                f"largest allowed rank {allowed[-1]} exceeds tolerance {tol:g}")
    lo, hi = 0, len(allowed) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if err(mid) <= tol:
            hi = mid
        else:
            lo = mid + 1
    return RankChoice(allowed[lo], f"relative output error {err(lo):.3g} <= tolerance {tol:g}")
