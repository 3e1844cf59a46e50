"""One trial of the study, and the target's criteria as constraints (<= 0 is met).

Cheap first: the candidate is built without its optional fine-tuning, FLOPs and size are
counted, and a candidate that already breaks a counted constraint is pruned (never timed);
then the proxy metric; then latency, only when an objective or the target needs it.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimkit.search.config import SearchConfig
from slimkit.search.objective import Evaluator, Measured, build, candidate_recipe
from slimkit.search.space import Space, candidate_stages, without_finetune


@dataclass
class Problem:
    """Everything a trial needs: the space, the measurer, the recipe and what is asked."""

    space: Space
    evaluator: Evaluator
    cfg: SearchConfig
    base: dict  # the recipe as a dict (its stages are the hand-written baseline recipe)
    target: Any
    objectives: list[str]
    log: Callable[[str], None]
    sensitivity: dict | None = None  # the sensitivity tier's report (None: off)

    @property
    def needs_latency(self) -> bool:
        return "latency" in self.objectives or self.target.min_speedup is not None

    def stages(self, params: dict[str, Any], finetune: bool = False) -> list[dict]:
        ft = self.cfg.finetune.model_dump(mode="json") if finetune and self.cfg.finetune \
            else None
        stages = candidate_stages(self.space, self.cfg, params, self.base["stages"], ft)
        return stages if finetune else without_finetune(stages)


def constraints(p: Problem, m: Measured, base_metrics: dict[str, float]) -> list[float]:
    """Each criterion of the target (and the FLOPs budget) as ``achieved - allowed`` scaled
    by what is asked: <= 0 is met. A criterion not measured yet counts as met (0)."""
    out: list[float] = []
    t, task = p.target, p.evaluator.task
    if t.max_accuracy_drop is not None:
        drop = 100.0 * (base_metrics["top1"] - m.metrics["top1"]) if m.metrics else 0.0
        out.append((drop - t.max_accuracy_drop) / max(t.max_accuracy_drop, 1.0))
    for name, asked in (t.max_metric_drop or {}).items():
        drop = task.drop(name, base_metrics[name], m.metrics[name]) if m.metrics else 0.0
        out.append((drop - asked) / max(asked, 1e-3))
    if t.min_size_ratio is not None:
        out.append((t.min_size_ratio - 1.0 / m.size_share) / t.min_size_ratio
                   if m.size_share else 0.0)
    if t.min_speedup is not None:
        speed = 1.0 / m.time_ratio if m.time_ratio else None
        out.append((t.min_speedup.value - speed) / t.min_speedup.value if speed else 0.0)
    if p.cfg.flops_budget is not None:
        out.append((m.flops_share - p.cfg.flops_budget) / p.cfg.flops_budget
                   if m.flops_share is not None else 0.0)
    return out


def values(p: Problem, m: Measured) -> list[float]:
    """The objectives in study order: the metric, latency as the time ratio to the baseline,
    size and FLOPs as shares of the baseline's."""
    table = {"metric": m.metric, "latency": m.time_ratio, "size": m.size_share,
             "flops": m.flops_share}
    return [float(table[o]) for o in p.objectives]


def measure(p: Problem, params: dict[str, Any], real: bool = False,
            on_counts: Callable[[Measured], None] | None = None) -> tuple[Any, Measured]:
    """Build and measure the candidate ``params``.

    ``real`` (the front tier): the recipe as written (with fine-tuning), the metric as it
    is (no BatchNorm re-estimation), timed with more rounds. Otherwise the cheap tier;
    ``on_counts`` sees the counts before the proxy metric and may raise to stop there.
    """
    ev = p.evaluator
    recipe = candidate_recipe(p.base, p.stages(params, finetune=real))
    cand = build(ev.model, ev.data, recipe)
    m = ev.counts(cand)
    if on_counts is not None:
        on_counts(m)
    ev.proxy(cand, m, recalibrate=not real)
    if p.needs_latency or real:
        ev.latency(cand, m, repeats=ev.repeats * 3 if real else None)
    return recipe, m


def objective(p: Problem) -> Callable[[Any], Any]:
    """The Optuna objective of problem ``p``."""
    from slimkit.search.study import optuna

    opt = optuna()

    def run(trial: Any) -> Any:
        params = {d.name: trial.suggest_categorical(d.name, d.choices) for d in p.space.dims()}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        same = _measured_before(trial, params)
        if same is not None:  # a sampler proposing a candidate again: no need to rebuild it
            for key in ("measured", "constraints", "stages"):
                trial.set_user_attr(key, same.user_attrs[key])
            trial.set_user_attr("duplicate_of", same.number)
            return same.values if len(same.values) > 1 else same.values[0]

        def hopeless(m: Measured) -> None:
            trial.set_user_attr("measured", m.to_dict())
            if _counted_broken(p, m):
                trial.set_user_attr("constraints", constraints(p, m, p.evaluator.base_metrics))
                raise opt.TrialPruned("a counted constraint (size or FLOPs) is broken")

        try:
            recipe, m = measure(p, params, on_counts=hopeless)
        except opt.TrialPruned:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            trial.set_user_attr("error", f"{type(exc).__name__}: {first}")
            p.log(f"trial {trial.number} failed ({type(exc).__name__}: {first}); going on")
            raise
        cons = constraints(p, m, p.evaluator.base_metrics)
        trial.set_user_attr("measured", m.to_dict())
        trial.set_user_attr("constraints", cons)
        trial.set_user_attr("stages", [s.model_dump(mode="json", exclude_defaults=True)
                                       for s in recipe.stages])
        vals = values(p, m)
        if not all(math.isfinite(v) for v in vals):
            trial.set_user_attr("error", f"objective values {vals} are not finite")
        return vals if len(vals) > 1 else vals[0]

    return run


def _measured_before(trial: Any, params: dict[str, Any]) -> Any:
    """A finished trial of the study with the same choices, or None."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE" and t.params == params and "stages" in t.user_attrs:
            return t
    return None


def _counted_broken(p: Problem, m: Measured) -> bool:
    t = p.target
    size = t.min_size_ratio is not None and m.size_share and 1.0 / m.size_share < t.min_size_ratio
    flops = p.cfg.flops_budget is not None and m.flops_share > p.cfg.flops_budget
    return bool(size or flops)


def constraints_func(p: Problem) -> Callable[[Any], list[float]] | None:
    """The samplers' view of a trial's constraints (one without them: infeasible), or None
    when nothing is constrained."""
    n = len(constraints(p, Measured(), p.evaluator.base_metrics))
    if n == 0:
        return None
    return lambda trial: list(trial.user_attrs.get("constraints", [1.0] * n))


__all__ = ["Problem", "constraints", "constraints_func", "measure", "objective", "values"]
