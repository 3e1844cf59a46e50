"""The cheapest tier of the search: per-layer sensitivity, measured once before any trial.

Each searched setting (one dimension of the space at one of its choices: a group's pruning
ratio, a layer's bits, a layer's low-rank share) is applied *alone*, every other dimension
left as the model is, and the proxy metric's drop from the (BatchNorm re-estimated) baseline
is measured on the validation split: the one-at-a-time lesion that mixed precision measures
per bit width (:func:`slimkit.quant.mixed.layer_sensitivity`), here with the very stages the
trials apply (the structured pruning criterion and rounding, the weight-only quantizer and
its group size, the factorizer) and in the units of the target's drop, so that it can be
compared with the target.

The table is used twice:

* **to shape the space**: a setting whose drop alone already exceeds the budget (the
  target's metric drop) is excluded from its dimension, with every more aggressive setting
  of that dimension (a cap: the drop of one more channel removed is not expected to be
  smaller; measurement noise must not reopen a setting above an excluded one). The mildest
  setting always stays. Every exclusion is recorded, with its measured drop.
* **to seed the study**: the first trials are allocations in which each dimension takes its
  most aggressive allowed setting whose drop alone is at most a threshold (the sensitivity
  analysis allocation of Han et al. 2015 and Distiller), for a ladder of thresholds from
  ``budget / dimensions`` (the summed drops within the budget, were they additive) to the
  budget; without a budget the thresholds are quantiles of the measured drops.

The table is cached in ``OUT/sensitivity.json`` (keyed by the study's fingerprint) and in the
study's attributes (where workers on other machines find it), so a resumed search, or a
worker, does not measure it again, and every process of one study shapes the same space.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimkit.core.files import write_json
from slimkit.search.space import Dim, Space, candidate_stages, without_finetune

FILE = "sensitivity.json"
ATTR = "sensitivity"
#: Per kind of dimension (its name's prefix): the setting that changes nothing, and the
#: aggressiveness of a setting (larger: more aggressive).
KINDS: dict[str, tuple[Any, Callable[[Any], float]]] = {
    "prune": (0.0, float),
    "bits": ("float", lambda b: 0.0 if b == "float" else 1.0 / float(b)),
    "lowrank": (1.0, lambda s: 1.0 - float(s)),
}


def kind_of(dim: Dim) -> str | None:
    """``prune``, ``bits`` or ``lowrank`` (the dimensions sensitivity is measured for)."""
    kind = dim.name.split(":", 1)[0]
    return kind if kind in KINDS else None


def ordered(dim: Dim) -> list[Any]:
    """The dimension's choices, mildest first."""
    return sorted(dim.choices, key=KINDS[kind_of(dim)][1])


def measured_dims(space: Space) -> list[Dim]:
    """The dimensions with a setting to measure (a kind above, more than one choice)."""
    return [d for d in space.dims() if kind_of(d) is not None and len(d.choices) > 1]


def _identity(space: Space) -> dict[str, Any]:
    """Every dimension at the setting that leaves the model as it is."""
    out: dict[str, Any] = {}
    for d in space.dims():
        kind = kind_of(d)
        out[d.name] = KINDS[kind][0] if kind else (0.0 if d.name == "blocks" else True)
    return out


def _neutral(cfg: Any) -> Any:
    """``cfg`` with its fixed (single-choice) pruning neutral: a lone setting is measured
    on the model as it is."""
    if cfg.prune is None:
        return cfg
    return cfg.model_copy(update={"prune": cfg.prune.model_copy(
        update={"ratios": [0.0, *cfg.prune.ratios], "blocks": [0.0]})})


def measure_table(p: Any, log: Callable[[str], None]) -> dict:
    """Measure every setting of every measured dimension alone (see the module docstring).

    One proxy evaluation per setting, each as costly as a trial's; when the space is shaped
    by a budget, the settings more aggressive than one already over it are not measured
    (the cap excludes them whatever they measure).

    Returns:
        ``{"metric", "base": proxy baseline metric, "dims": [{"name", "layers", "choices",
        "settings": [{"choice", "metric", "drop", "flops_share"} or {"choice", "error"}]}],
        "seconds"}``; drops in the searched metric's units, positive when worse.
    """
    from slimkit.measure.counts import count_flops
    from slimkit.search.objective import build, candidate_recipe

    ev, start = p.evaluator, time.perf_counter()
    base = ev.base_metrics[ev.metric]
    cfg, neutral = _neutral(p.cfg), _identity(p.space)
    budget = budget_of(p)[0] if p.cfg.sensitivity.shape else None
    dims = measured_dims(p.space)
    n = sum(len(d.choices) - (KINDS[kind_of(d)][0] in d.choices) for d in dims)
    log(f"sensitivity: measuring up to {n} settings of {len(dims)} dimensions, each alone ...")
    out = []
    for d in dims:
        settings: list[dict] = []
        for choice in ordered(d):
            if choice == KINDS[kind_of(d)][0]:
                continue
            if budget is not None and settings and ("error" in settings[-1]
                                                    or settings[-1]["drop"] > budget):
                break  # capped: see shape()
            stages = without_finetune(candidate_stages(p.space, cfg, {**neutral, d.name: choice},
                                                       []))
            entry: dict[str, Any] = {"choice": choice}
            try:
                cand = build(ev.model, ev.data, candidate_recipe(p.base, stages))
                flops = count_flops(cand.module, ev.example)["flops"] / ev.base_flops
                metric = ev.metrics(cand, recalibrate=True)[ev.metric]
                if not math.isfinite(metric):
                    raise ValueError(f"{ev.metric} is {metric}")
                entry.update(metric=metric, drop=ev.task.drop(ev.metric, base, metric),
                             flops_share=flops)
            except Exception as exc:  # recorded; the setting is then excluded as failing
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                entry["error"] = f"{type(exc).__name__}: {first}"
                log(f"sensitivity: {d.name}={choice} failed alone ({entry['error']})")
            settings.append(entry)
        out.append({"name": d.name, "layers": d.layers, "choices": list(d.choices),
                    "settings": settings})
    return {"metric": ev.metric, "base": base, "dims": out,
            "seconds": time.perf_counter() - start}


def budget_of(p: Any) -> tuple[float | None, str]:
    """The drop one setting alone may cause (in the searched metric's units) and where it
    comes from."""
    opts, t, metric = p.cfg.sensitivity, p.target, p.evaluator.metric
    if opts.budget is not None:
        return opts.budget, "search.sensitivity.budget"
    if t.max_metric_drop and metric in t.max_metric_drop:
        return float(t.max_metric_drop[metric]), f"target.max_metric_drop.{metric}"
    if t.max_accuracy_drop is not None and metric == "top1":
        return t.max_accuracy_drop / 100.0, (f"target.max_accuracy_drop ({t.max_accuracy_drop}"
                                             " points)")
    return None, "no metric-drop target and no search.sensitivity.budget: nothing excluded"


def _setting(table: dict, name: str) -> dict[Any, dict]:
    dim = next((d for d in table["dims"] if d["name"] == name), None)
    return {s["choice"]: s for s in dim["settings"]} if dim else {}


def shape(space: Space, table: dict, budget: float | None,
          enabled: bool) -> tuple[Space, list[dict]]:
    """A copy of ``space`` with the settings over ``budget`` excluded (when ``enabled``),
    and the report's row per measured dimension: drops, kept and excluded choices (why)."""
    out = copy.deepcopy(space)
    rows = []
    judged = enabled and budget is not None  # a failing setting is excluded without one
    for d in measured_dims(out):
        settings, kept, excluded, note = _setting(table, d.name), [], [], None
        capped_at = None
        for choice in ordered(d):
            s = settings.get(choice, {})
            own = (f"failed alone ({s['error']})" if enabled and "error" in s else
                   f"drop alone {s['drop']:.4g} > budget {budget:.4g}"
                   if judged and s.get("drop") is not None and s["drop"] > budget else None)
            if own is not None or capped_at is not None:  # a cap: see the module docstring
                capped_at = choice if capped_at is None else capped_at
                excluded.append({"choice": choice, "why": own or (
                    f"more aggressive than {capped_at}, which is excluded")})
            else:
                kept.append(choice)
        if not kept:  # the mildest setting always stays, even over the budget
            kept.append(excluded.pop(0)["choice"])
            note = f"every setting is over the budget; the mildest, {kept[0]}, is kept"
        d.choices = [c for c in d.choices if c in kept]
        identity = KINDS[kind_of(d)][0]
        rows.append({"name": d.name, "layers": d.layers,
                     "drops": [{"choice": c, **settings.get(c, {"drop": 0.0} if c == identity
                                                            else {})}
                               for c in ordered(d) + [e["choice"] for e in excluded]],
                     "kept": d.choices, "excluded": excluded, "note": note})
    return out, rows


def seeds(space: Space, table: dict, budget: float | None, k: int) -> list[dict]:
    """Up to ``k`` distinct allocations of the measured dimensions (see the module
    docstring), mildest first; the study's sampler fills the other dimensions."""
    dims = measured_dims(space)
    drops = sorted(s["drop"] for d in table["dims"] for s in d["settings"]
                   if s.get("drop") is not None)
    if not dims or not drops or k <= 0:
        return []
    if budget is not None:
        lo = budget / len(dims)
        ladder = [lo * (budget / lo) ** (i / max(k - 1, 1)) for i in range(k)]
    else:
        ladder = [drops[min(len(drops) - 1, int(len(drops) * (i + 1) / (k + 1)))]
                  for i in range(k)]
    out: list[dict] = []
    for threshold in ladder:
        alloc = {}
        for d in dims:
            settings, pick = _setting(table, d.name), ordered(d)[0]
            identity = KINDS[kind_of(d)][0]
            for choice in ordered(d):
                drop = 0.0 if choice == identity else settings.get(choice, {}).get("drop")
                if drop is not None and drop <= threshold:
                    pick = choice
                else:
                    break  # more aggressive settings are not taken past one over it
            alloc[d.name] = pick
        if alloc not in out and any(alloc[d.name] != ordered(d)[0] for d in dims):
            out.append(alloc)
    return out


def load(out: Path, fingerprint: str, stored: dict | None) -> tuple[dict | None, str]:
    """The cached table: the study's (``stored``, its user attributes) or ``OUT/FILE``, when
    made by this run (``fingerprint``)."""
    if stored and stored.get(ATTR) and stored.get("slimkit_fingerprint") == fingerprint:
        return stored[ATTR], "the study's storage"
    path = out / FILE
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            return None, ""
        if cached.get("fingerprint") == fingerprint:
            return cached["table"], str(path)
    return None, ""


def save(out: Path, fingerprint: str, table: dict) -> None:
    path = out / FILE
    if path.is_file():
        try:
            if json.loads(path.read_text()) == {"fingerprint": fingerprint, "table": table}:
                return
        except (OSError, ValueError):
            pass
    write_json(path, {"fingerprint": fingerprint, "table": table})


def plain(table: dict) -> dict:
    """``table`` as JSON gives it back (what the study's attributes and the file hold), so a
    measured table and a reused one compare equal."""
    return json.loads(json.dumps(table, default=float))


def prepare(p: Any, out: Path, fingerprint: str, stored: dict | None,
            log: Callable[[str], None]) -> tuple[Space, dict | None, dict | None]:
    """Load or measure the table (and cache it in ``out``), shape ``p.space``.

    Args:
        stored: the study's user attributes, when it exists.

    Returns:
        ``(shaped space, report, table)``; report and table None when sensitivity is off.
    """
    if p.cfg.sensitivity is None:
        return p.space, None, None
    table, source = load(out, fingerprint, stored)
    if table is None:
        table, source = plain(measure_table(p, log)), ""
    else:
        log(f"sensitivity: reused from {source} (not measured again)")
    save(out, fingerprint, table)
    return (*apply(p, table, source), table)


def apply(p: Any, table: dict, source: str) -> tuple[Space, dict]:
    """Shape ``p.space`` with ``table``: the shaped space and the report."""
    opts = p.cfg.sensitivity
    budget, origin = budget_of(p)
    shaped, rows = shape(p.space, table, budget, opts.shape)
    seeded = seeds(shaped, table, budget, opts.seeds)
    report = {
        "metric": table["metric"], "proxy_baseline": table["base"],
        "unit": f"drop of {table['metric']} (validation split, BatchNorm re-estimated) with "
                "the setting applied alone",
        "budget": budget, "budget_from": origin, "shaped": opts.shape and budget is not None,
        "cached": bool(source), "source": source or "measured",
        "seconds": table["seconds"], "dims": rows, "seeds": seeded,
        "excluded": sum(len(r["excluded"]) for r in rows),
    }
    return shaped, report


__all__ = ["ATTR", "FILE", "apply", "budget_of", "measure_table", "prepare", "seeds", "shape"]
