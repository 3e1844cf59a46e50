"""Measured targets of structured pruning, and the width step that meets one (or a ratio).

A :class:`Target` holds what was asked (``{"flops": 0.5}``: keep at most half of the base
model's FLOPs) and how each key is measured on a candidate, as a fraction of the base model
(:func:`slimkit.measure.relative.fractions_of`: counts, or latency timed interleaved with the
base). :func:`width_step` plans for a ratio, or searches the smallest ratio whose pruned copy
meets the target, and applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from slimkit.core.progress import step
from slimkit.io import batch as B
from slimkit.measure.relative import Fractions, fractions_of
from slimkit.prune.allocate import SearchResult, search_ratio
from slimkit.prune.structured_config import StructuredPruneConfig
from slimkit.prune.structured_plan import Job, RatioPlanner, pruned_failure

Step = tuple[nn.Module, dict[str, Any], dict[str, Any]]  # pruned model, plan, target record


@dataclass(frozen=True)
class Target:
    """A measured goal: per key, the share of the base model's measurement to keep at most.

    Attributes:
        asked: ``{key: share}``, keys among flops, params, latency, primary first.
        fractions: ``{key: model -> measured(model) / measured(base)}``.

    Example:
        >>> t = make_target(StructuredPruneConfig(target={"flops": 0.5}), (x,), net)
        >>> t.worst(small) <= 1.0  # every key met
    """

    asked: dict[str, float]
    fractions: Fractions

    @property
    def keys(self) -> list[str]:
        return list(self.asked)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Every key's fraction of the base, measured on ``model``."""
        return {k: f(model) for k, f in self.fractions.items()}

    def worst(self, model: nn.Module) -> float:
        """The largest ``measured / asked`` (at most 1 = every key met)."""
        return max(f(model) / self.asked[k] for k, f in self.fractions.items())

    def only(self, keys: list[str]) -> Target:
        """The same goal restricted to ``keys`` (their order kept)."""
        return Target({k: self.asked[k] for k in keys},
                      {k: f for k, f in self.fractions.items() if k in keys})

    def at_step(self, s: int, steps: int) -> Target:
        """Step ``s`` of ``steps``: the shares fall linearly from 1 to the asked ones."""
        return replace(self, asked={k: 1.0 - (1.0 - f) * s / steps
                                    for k, f in self.asked.items()})


def make_target(cfg: StructuredPruneConfig, example: B.Inputs,
                base: nn.Module) -> Target | None:
    """The measurements of ``cfg.target`` as fractions of ``base`` (None in ratio mode)."""
    if cfg.target is None:
        return None
    return Target(dict(cfg.target), fractions_of(base, list(cfg.target), example,
                                                 cfg.latency_threads, cfg.latency_batches))


def width_step(model: nn.Module, job: Job, ratio: float | None,
               target: Target | None) -> tuple[nn.Module, dict, dict | None]:
    """One prune step: plan (for a ratio, or searching the ratio that meets a target), apply.

    A target is met when every measured fraction is at most its asked share; the search
    bisects on the worst ``measured / asked`` (1 = on target).

    Returns:
        The pruned copy, its plan, and with a target the search's record (ratio, asked,
        achieved, reached, trials).

    Raises:
        ModelError: a candidate fails on the example inputs (naming the module to exclude).
    """
    planner = RatioPlanner(model, job)
    if target is None:
        pruned, plan = planner.prune(ratio or 0.0)
        return pruned, plan, None

    def measure(r: float) -> float:
        candidate = planner.prune(r)[0]
        try:
            return target.worst(candidate)
        except Exception as exc:  # measuring runs it: a hard-coded size fails here first
            raise pruned_failure(candidate, exc) from exc

    with step("structured pruning: searching the ratio that meets the target",
              unit="trials") as shown:
        result = _search(shown.counted(measure), job.cfg.max_layer_ratio)
    pruned, plan = planner.prune(result.ratio)
    # "reached" is the search's verdict on the ratio it chose; "achieved" is measured again
    # (latency may differ by noise; the final record re-measures and says so).
    return pruned, plan, {"ratio": result.ratio, "asked": target.asked,
                          "achieved": target.measure(pruned), "reached": result.reached,
                          "trials": result.trials}


def _search(measure: Callable[[float], float], hi: float) -> SearchResult:
    """The smallest ratio in ``[0, hi]`` whose ``measure`` is at most 1.

    The bisection of :func:`~slimkit.prune.allocate.search_ratio` never tries ratio 0 itself.
    When no trial missed the target (it only fell toward 0), the unpruned model may already
    meet it: then ratio 0 is measured and, if it does, nothing is removed.
    """
    result = search_ratio(measure, 1.0, hi)
    if not result.reached or result.ratio == 0.0:
        return result
    if any(t["fraction"] > 1.0 for t in result.trials):
        return result  # a smaller ratio missed: ratio 0 (removing less still) misses too
    v = measure(0.0)
    trials = [*result.trials, {"ratio": 0.0, "fraction": v}]
    if v <= 1.0:
        return SearchResult(0.0, v, 1.0, True, trials)
    return SearchResult(result.ratio, result.achieved, result.asked, True, trials)


__all__ = ["Step", "Target", "make_target", "width_step"]
