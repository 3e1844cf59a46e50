"""``slimkit.search``: run (or join) a study, measure its best candidates for real, write the
chosen recipe.

Outputs in ``out``: ``search.db`` (the SQLite study, unless ``storage`` names another),
``recipe.yaml`` (the chosen recipe, which ``slimkit compress`` replays), ``search.json``
(every trial, the front, the chosen point, the hand-written recipe's point) and
``search.html`` (the Pareto fronts and the top trials).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimkit.core.errors import MissingDataError, SlimkitError
from slimkit.data.bundle import DataBundle
from slimkit.io.model import SlimModel
from slimkit.pipeline.recipe import load_recipe, recipe_to_dict
from slimkit.pipeline.verdict import check_target
from slimkit.search import sensitivity
from slimkit.search.config import SearchConfig
from slimkit.search.finish import finish
from slimkit.search.objective import Evaluator
from slimkit.search.space import build_space
from slimkit.search.study import (
    STUDY,
    check_fingerprint,
    make_sampler,
    open_storage,
    open_study,
    optuna,
    run_trials,
    stored_attrs,
)
from slimkit.search.trial import Problem, constraints_func, objective

DB = "search.db"
OUTPUTS = (DB, "recipe.yaml", "search.json", "search.html", sensitivity.FILE)


class TargetUnreachableError(SlimkitError):
    """No candidate of the search space met the target (raised only when it is required)."""


class SearchResult(dict):
    """What ``search`` gives back: ``search.json`` as a dict, plus ``recipe`` (the chosen
    recipe as a dict, None for a worker) and ``recipe_path``."""

    @property
    def met(self) -> bool:
        return bool(self.get("chosen", {}).get("met"))

    @property
    def recipe(self) -> dict | None:
        return self.get("chosen", {}).get("recipe")

    @property
    def recipe_path(self) -> Path | None:
        p = self.get("outputs", {}).get("recipe")
        return Path(p) if p else None


def _metric_name(recipe: Any, task: Any) -> str:
    t = recipe.target
    if t.max_metric_drop:
        return next(iter(t.max_metric_drop))
    if t.max_accuracy_drop is not None:
        return "top1"
    return task.primary


def _problem(model: SlimModel, data: DataBundle, recipe: Any, log: Callable) -> Problem:
    from slimkit.measure.tasks import get_task

    cfg: SearchConfig = recipe.search or SearchConfig()
    t = recipe.target
    runtime = cfg.latency.runtime or (t.min_speedup.runtime if t.min_speedup else "onnxruntime")
    batch = cfg.latency.batch or (t.min_speedup.batch if t.min_speedup else 32)
    ev = Evaluator(model, data, _metric_name(recipe, get_task(data.task)), runtime, batch,
                   cfg.latency.repeats, cfg.latency.warmup, cfg.proxy, recipe.seed,
                   threads=recipe.measure.threads)
    base = recipe_to_dict(recipe)
    space = build_space(model.module, data.example_inputs(1), cfg, base["stages"])
    return Problem(space, ev, cfg, base, t, list(cfg.objectives), log)


def _what_trials_measure(recipe: Any) -> dict:
    """The recipe without what may change between runs of one study: how many trials run,
    and how many front candidates are measured for real at the end."""
    out = recipe_to_dict(recipe)
    if out.get("search"):
        out["search"] = {k: v for k, v in out["search"].items() if k not in ("trials", "front")}
    return out


def _directions(p: Problem) -> list[str]:
    return [("maximize" if p.evaluator.higher_is_better else "minimize") if o == "metric"
            else "minimize" for o in p.objectives]


def search(model: SlimModel, data: DataBundle | None, recipe: Any, out: str | Path, *,
           storage: str | None = None, study_name: str = STUDY, worker: bool = False,
           trials: int | None = None, overwrite: bool = False, require_target: bool = False,
           log: Callable[[str], None] = print) -> SearchResult:
    """Search the recipe's ``search:`` space for the recipe that meets its ``target:`` with
    the best objective (see :mod:`slimkit.search`).

    Args:
        recipe: a path, YAML text, dict or Recipe; its stages are the hand-written baseline.
        out: where the study (SQLite by default), ``recipe.yaml`` and the report go; an
            interrupted search resumes from it when run again.
        storage: an Optuna RDB URL shared by workers (``postgresql://user@host/db``).
        worker: only run trials of the (shared) study; the coordinator (without ``worker``)
            measures the front and writes the outputs.
        trials: overrides ``search.trials``.
        require_target: raise :class:`TargetUnreachableError` when no candidate meets it.

    Raises:
        MissingDataError: no data (the proxy metric needs a validation split).
        ResumeError: the study was created by another model, data or recipe.
        StorageError: the storage cannot be opened. ConfigError: a bad space.

    Example:
        >>> result = slimkit.search(model, data, "recipe.yaml", "search-out/")
        >>> result.met, result.recipe_path  # then: slimkit compress --recipe that path
    """
    if not hasattr(recipe, "stages"):
        recipe = load_recipe(recipe)
    if data is None:
        raise MissingDataError("search needs data: its candidates are judged on the "
                               "validation split of the training data (give --data)")
    check_target(recipe.target, data)
    out = Path(out)
    if overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from slimkit.pipeline.runner import fingerprint

    store = open_storage(storage or f"sqlite:///{out / DB}",
                         (recipe.search or SearchConfig()).heartbeat)  # before the baseline
    p = _problem(model, data, recipe, log)
    try:
        return _search(p, store, study_name, worker, trials, overwrite and storage is not None,
                       require_target, out, start, fingerprint(model, data,
                                                               _what_trials_measure(recipe)),
                       log)
    finally:
        p.evaluator.close()


def _enqueue_first(p: Problem, study: Any, log: Callable[[str], None]) -> None:
    """The first trials of a new study (those past the trial budget wait for a resume): the
    sensitivity-guided allocations, then the uniform ones (``warm_start``), each ratio
    capped by the shaped space, none twice."""
    first: list[dict] = list((p.sensitivity or {}).get("seeds", []))
    if p.cfg.warm_start and p.space.prune:
        for ratio in p.cfg.prune.ratios:
            alloc = {d.name: max((c for c in d.choices if c <= ratio), default=min(d.choices))
                     for d in p.space.prune}
            if alloc not in first:
                first.append(alloc)
    for params in first:
        study.enqueue_trial(params)
    if p.sensitivity is not None and p.sensitivity["seeds"]:
        log(f"sensitivity: {len(p.sensitivity['seeds'])} guided allocations enqueued first")


def _search(p: Problem, store: Any, study_name: str, worker: bool, trials: int | None,
            drop_shared: bool, require_target: bool, out: Path, start: float, fp: str,
            log: Callable[[str], None]) -> SearchResult:
    """The study's part of :func:`search`, after the baseline was measured."""
    budget = trials or p.cfg.trials
    seed = p.base["seed"]
    if drop_shared and not worker:  # --overwrite starts over in a shared storage too
        with contextlib.suppress(KeyError):
            optuna().delete_study(study_name=study_name, storage=store)
    unshaped = p.space
    attrs = stored_attrs(store, study_name)
    check_fingerprint(attrs or {}, study_name, fp)  # before measuring anything for it
    p.space, p.sensitivity, table = sensitivity.prepare(p, out, fp, attrs, log)
    cons = constraints_func(p)

    def sampler_for(n: int) -> Any:
        amc = {"prune": [(d.name, d.choices) for d in p.space.prune],
               "budget": p.cfg.flops_budget, "maximize": p.evaluator.higher_is_better}
        return make_sampler(p.cfg.sampler, len(p.objectives), seed * 100_003 + n, cons, amc)

    study = open_study(store, study_name, _directions(p), sampler_for(0), fp,
                       p.space.describe(), {sensitivity.ATTR: table} if table else None)
    theirs = study.user_attrs.get(sensitivity.ATTR)
    if table is not None and theirs is not None and theirs != table:  # a racing creator's
        p.space = unshaped
        p.space, p.sensitivity = sensitivity.apply(p, theirs, "the study's storage")
        sensitivity.save(out, fp, theirs)
    done = len(study.get_trials(deepcopy=False))
    if done:
        log(f"study '{study_name}': {done} trials found, continuing to {budget}")
    elif not worker:
        _enqueue_first(p, study, log)
    ran = run_trials(study, objective(p), budget, sampler_for)
    if worker:
        return SearchResult({"worker": True, "trials_run": ran,
                             "trials": len(study.get_trials(deepcopy=False))})
    result = SearchResult(finish(p, study, out, time.perf_counter() - start, log))
    if require_target and not result.met:
        raise TargetUnreachableError(
            f"no candidate met the target; the closest ({result['chosen']['why']}) is written "
            f"to {out / 'recipe.yaml'}")
    return result
