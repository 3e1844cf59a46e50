"""After the trials: the front, measured for real, the chosen point and the written outputs.

The proxy ranks candidates; the chosen one is picked on real measurements: each front
candidate's recipe as written (with its fine-tuning), its metric on the validation split as
it is (no BatchNorm re-estimation), timed again with three times the rounds. The
hand-written recipe is measured the same way, as the point to beat.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from slimkit.core.files import write_json
from slimkit.pipeline.recipe import recipe_to_dict
from slimkit.search.objective import Measured, build
from slimkit.search.trial import Problem, constraints, values


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    better = [s * x <= s * y for x, y, s in zip(a, b, signs, strict=True)]
    strictly = [s * x < s * y for x, y, s in zip(a, b, signs, strict=True)]
    return all(better) and any(strictly)


def pareto(rows: list[dict], signs: list[float]) -> list[dict]:
    """The rows whose ``values`` no other row dominates (``signs``: -1 maximize, +1 minimize)."""
    return [r for r in rows if not any(_dominates(o["values"], r["values"], signs)
                                       for o in rows if o is not r)]


def _violation(cons: list[float]) -> float:
    return sum(max(c, 0.0) for c in cons)


def trial_rows(study: Any) -> list[dict]:
    """Every trial run as a JSON row: number, state, params, values, measurements,
    constraints."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":  # enqueued, not run yet (a resume runs it)
            continue
        rows.append({"number": t.number, "state": t.state.name, "params": t.params,
                     "enqueued": "fixed_params" in t.system_attrs,  # seeded, not sampled
                     "values": t.values, "measured": t.user_attrs.get("measured"),
                     "constraints": t.user_attrs.get("constraints"),
                     "feasible": (t.state.name == "COMPLETE"
                                  and _violation(t.user_attrs.get("constraints", [])) == 0),
                     "error": t.user_attrs.get("error"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    return rows


def _signs(p: Problem) -> list[float]:
    return [(-1.0 if p.evaluator.higher_is_better else 1.0) if o == "metric" else 1.0
            for o in p.objectives]


def front_candidates(p: Problem, rows: list[dict]) -> tuple[list[dict], bool]:
    """The candidates measured for real: the feasible Pareto front (best metric first; the
    best feasible trials for one objective), at most ``front``; with no feasible trial, the
    closest (least violation) instead.

    Returns:
        The candidates and whether they are feasible.
    """
    done = [r for r in rows if r["state"] == "COMPLETE"]
    feasible = [r for r in done if r["feasible"]]
    sign = _signs(p)[p.objectives.index("metric")] if "metric" in p.objectives else 1.0
    key = (lambda r: sign * r["measured"]["metric"]) if "metric" in p.objectives \
        else (lambda r: r["values"][0])
    if feasible:  # one objective: its best few; several: the front, best metric first
        pool = feasible if len(p.objectives) == 1 else pareto(feasible, _signs(p))
        return sorted(pool, key=key)[:p.cfg.front], True
    near = [r for r in rows if r["constraints"] is not None]
    near.sort(key=lambda r: (r["state"] != "COMPLETE", _violation(r["constraints"]),
                             key(r) if r["values"] else 0))
    return near[:p.cfg.front], False


def _real(p: Problem, params: dict | None) -> tuple[dict, Measured, list[float]]:
    """The recipe of ``params`` (None: the hand-written one) measured for real."""
    from slimkit.search.objective import candidate_recipe
    from slimkit.search.trial import measure

    if params is None:
        ev = p.evaluator
        recipe = candidate_recipe(p.base, p.base["stages"])
        cand = build(ev.model, ev.data, recipe)
        m = ev.counts(cand)
        ev.proxy(cand, m, recalibrate=False)
        ev.latency(cand, m, repeats=ev.repeats * 3)
    else:
        recipe, m = measure(p, params, real=True)
    return recipe_to_dict(recipe), m, constraints(p, m, p.evaluator.base_metrics_raw)


def _point(label: str, recipe: dict, m: Measured, cons: list[float], p: Problem) -> dict:
    return {"label": label, "recipe": recipe, "measured": m.to_dict(), "constraints": cons,
            "met": _violation(cons) == 0, "values": values(p, m) if m.metric is not None
            else None}


def _safely(p: Problem, params: dict | None, label: str,
            log: Callable[[str], None]) -> dict | None:
    """:func:`_point` of the real measurement, or None (logged) when the recipe fails."""
    try:
        return _point(label, *_real(p, params), p)
    except Exception as exc:  # a crashing or NaN recipe is recorded, the search goes on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"{label} failed when measured for real ({type(exc).__name__}: {first})")
        return None


def finish(p: Problem, study: Any, out: Path, seconds: float,
           log: Callable[[str], None]) -> dict:
    """Measure the front for real, choose, write ``recipe.yaml``, ``search.json`` and the
    HTML report; the result dict (as ``search.json``)."""
    rows = trial_rows(study)
    cands, feasible = front_candidates(p, rows)
    if not cands:
        from slimkit.core.errors import ConfigError

        raise ConfigError(f"search: none of the {len(rows)} trials could be measured (every "
                          "one failed; see their errors in the log)")
    if not feasible:
        log("no trial met the target on the proxy measurements; measuring the closest")
    points = []
    for r in cands:
        log(f"measuring trial {r['number']} for real ...")
        point = _safely(p, r["params"], f"trial {r['number']}", log)
        if point is not None:
            points.append({"trial": r["number"], **point})
    if not points:
        from slimkit.core.errors import ModelError

        raise ModelError("search: every front candidate failed when measured for real (with "
                         "its fine-tuning); see the log")
    hand = _safely(p, None, "hand-written recipe", log) or {
        "label": "hand-written recipe", "met": False, "measured": None,
        "error": "it failed (see the log)"}
    sign = -1.0 if p.evaluator.higher_is_better else 1.0
    chosen = min(points, key=lambda q: (_violation(q["constraints"]),
                                        sign * q["measured"]["metric"],
                                        q["measured"]["time_ratio"] or 0))
    gap = _violation(chosen["constraints"])
    chosen["why"] = ("meets the target with the best metric of the front" if chosen["met"]
                     else f"closest to the target (violation {gap:.3g})")
    written = {k: v for k, v in chosen["recipe"].items() if k != "search"}
    (out / "recipe.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    result = {
        "study": study.study_name, "objectives": p.objectives,
        "metric": p.evaluator.metric, "higher_is_better": p.evaluator.higher_is_better,
        "trials": rows, "front": points, "chosen": chosen,
        "hand": hand, "baseline": {"metrics": p.evaluator.base_metrics_raw,
                                   "proxy_metrics": p.evaluator.base_metrics,
                                   "flops": p.evaluator.base_flops,
                                   "size_bytes": p.evaluator.base_size},
        "latency": {"runtime": p.evaluator.runtime, "batch": p.evaluator.batch},
        "space": p.space.describe(), "sensitivity": p.sensitivity, "seconds": seconds,
        "outputs": {"recipe": str(out / "recipe.yaml"), "json": str(out / "search.json")},
    }
    from slimkit.search.report import write_report

    result["outputs"]["html"] = str(out / "search.html")
    write_json(out / "search.json", result)
    write_report(result, out)
    log(f"chosen: trial {chosen['trial']} ({chosen['why']}); recipe: {out / 'recipe.yaml'}")
    return result


__all__ = ["finish", "front_candidates", "pareto", "trial_rows"]
