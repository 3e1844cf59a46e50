"""An AMC-style sampler: a layer-by-layer agent choosing pruning ratios under a FLOPs budget.

As in AMC (He et al., ECCV 2018) the agent walks the prunable groups in model order, chooses
each group's ratio, and clamps the choice so that the budget stays reachable with the
groups still to come pruned at most; the reward is the proxy metric. AMC trains a DDPG
actor; this agent keeps a Gaussian policy per layer updated by the cross-entropy method
(its mean: the choices of the best-rewarded trials, its spread shrinking as trials
accumulate), which needs no network and reads everything from the study's history, so it
resumes and runs on several workers like the other samplers. The FLOPs each group's ratio
removes is a linear model fitted to the measured trials (least squares), uniform before
there are enough.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from optuna.samplers import BaseSampler  # this module is imported only when a search runs

ELITE = 0.25  # share of the best-rewarded trials the policy mean follows
STARTUP = 4  # trials sampled around the budget's uniform ratio before the policy learns


class AmcSampler(BaseSampler):
    """An Optuna sampler for the pruning dimensions of a
    :class:`~slimkit.search.space.Space`; other dimensions are sampled uniformly.

    Args:
        prune: the pruning dimensions' names in model order, with their choices.
        budget: the largest FLOPs share allowed (None: no clamping).
        maximize: whether a larger metric is better.
    """

    def __init__(self, prune: list[tuple[str, list[float]]], budget: float | None,
                 maximize: bool, seed: int = 0) -> None:
        self.order = [n for n, _ in prune]
        self.choices = dict(prune)
        self.budget, self.sign = budget, 1.0 if maximize else -1.0
        self.rng = np.random.default_rng(seed)
        self._chosen: dict[int, dict[str, float]] = {}

    # --- Optuna's sampler interface -------------------------------------------------------
    def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
        return {}

    def before_trial(self, study: Any, trial: Any) -> None:
        self._chosen[trial.number] = {}

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._chosen.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self.rng = np.random.default_rng()

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        if name not in self.choices:
            return dist.choices[int(self.rng.integers(len(dist.choices)))]
        history = _history(study, self.order, self.sign)
        mean, spread = self._policy(history, name)
        ratio = float(self.rng.normal(mean, spread))
        chosen = self._chosen.setdefault(trial.number, {})
        floor = self._floor(name, chosen, _flops_weights(history, self.order))
        value = max(_snap(ratio, self.choices[name], up=False),
                    _snap(floor, self.choices[name], up=True))
        chosen[name] = value
        return value

    # --- the agent -----------------------------------------------------------------------
    def _policy(self, history: list[tuple[dict, float | None, float | None]],
                name: str) -> tuple[float, float]:
        """Mean and spread of layer ``name``'s ratio: the elite trials' mean choice."""
        rewarded = [(p, r) for p, r, _ in history if r is not None]
        start = 1.0 - self.budget if self.budget is not None else 0.5 * max(self.choices[name])
        if len(rewarded) < STARTUP:
            return start, 0.25
        rewarded.sort(key=lambda pr: -pr[1])
        elite = rewarded[:max(2, int(len(rewarded) * ELITE))]
        spread = max(0.05, 0.25 * 0.85 ** (len(rewarded) / 4))
        return float(np.mean([p[name] for p, _ in elite])), spread

    def _floor(self, name: str, chosen: dict[str, float], weights: dict[str, float]) -> float:
        """The smallest ratio that keeps the budget reachable with the later layers pruned
        at their largest ratio (AMC's action clamping); 0 without a budget."""
        if self.budget is None:
            return 0.0
        i = self.order.index(name)
        later = sum(weights[n] * max(self.choices[n]) for n in self.order[i + 1:])
        done = sum(weights[n] * chosen.get(n, 0.0) for n in self.order[:i])
        need = 1.0 - self.budget - done - later  # FLOPs share this layer must remove
        return max(0.0, need / weights[name])


def _history(study: Any, order: list[str],
             sign: float) -> list[tuple[dict, float | None, float | None]]:
    """(pruning choices, reward, FLOPs share) of every finished trial; the reward is the
    proxy metric, a broken constraint costs the metric's range, a pruned trial has none."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not all(n in t.params for n in order):
            continue
        m = t.user_attrs.get("measured") or {}
        reward = None
        if t.state.name == "COMPLETE" and m.get("metric") is not None:
            broken = any(c > 0 for c in t.user_attrs.get("constraints", []))
            reward = sign * float(m["metric"]) - (1e3 if broken else 0.0)
        rows.append(({n: t.params[n] for n in order}, reward, m.get("flops_share")))
    return rows


def _flops_weights(history: list, order: list[str]) -> dict[str, float]:
    """FLOPs share removed per unit of each layer's ratio: 1 - flops = sum_i w_i r_i."""
    rows = [(p, f) for p, _, f in history if f is not None]
    if len(rows) <= len(order):
        return dict.fromkeys(order, 1.0 / max(len(order), 1))
    a = np.array([[p[n] for n in order] for p, _ in rows])
    b = np.array([1.0 - f for _, f in rows])
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    return {n: float(max(x, 1e-3)) for n, x in zip(order, w, strict=True)}


def _snap(ratio: float, choices: list[float], up: bool) -> float:
    """The nearest choice (with a budget: the smallest choice at least ``ratio``, so the
    clamped action stays feasible; the largest when none is)."""
    if up:
        above = [c for c in sorted(choices) if c >= ratio - 1e-9]
        return above[0] if above else max(choices)
    return min(choices, key=lambda c: abs(c - ratio))


__all__ = ["AmcSampler"]
