"""The search's sensitivity tier: measured once (against a float64 reference), cached and
reused on resume, shaping the space under the target's drop, seeding the first trials, and
switched off giving the search without it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from slimkit.pipeline import load_recipe
from slimkit.search import sensitivity as S
from slimkit.search.config import SearchConfig
from slimkit.search.run import _problem, search
from slimkit.search.space import Dim, Space

pytest.importorskip("optuna")

FAST = {"threads": 1, "batch_sizes": [1, 8], "warmup": 1, "repeats": 3}
LAT = {"repeats": 3, "warmup": 1, "batch": 8, "runtime": "torch"}
QUIET = {"log": lambda s: None}


def _recipe(search_block: dict, **target) -> dict:
    return {"stages": [{"kind": "structured_prune", "ratio": 0.5}], "target": target,
            "measure": FAST, "search": {"latency": LAT, "front": 1, **search_block}}


def _drops(table: dict) -> dict[tuple[str, object], float]:
    return {(d["name"], s["choice"]): s["drop"] for d in table["dims"] for s in d["settings"]}


def _reference_drop(mlp, digits, layer: int, consumer: int, ratio: float) -> float:
    """Top-1 drop on the proxy's validation samples when layer ``layer`` loses ``ratio`` of
    its units, computed by hand in float64: the l2 criterion summed over the group's members
    (rows of its weight and bias, columns of the consumer), each divided by its mean; the
    lowest-scored units zeroed (a ReLU MLP without BatchNorm: removing a unit is zeroing it).
    """
    net = copy.deepcopy(mlp.module).double().eval()
    w, b, nxt = net[layer].weight.data, net[layer].bias.data, net[consumer].weight.data
    parts = [w.norm(dim=1), b.abs(), nxt.norm(dim=0)]
    score = sum(s / s.mean() for s in parts)
    drop = torch.argsort(score, stable=True)[:round(ratio * len(score))]
    x, y = _val(digits)
    with torch.no_grad():
        base = (net(x.double()).argmax(1) == y).double().mean()
        w[drop], b[drop] = 0.0, 0.0
        pruned = (net(x.double()).argmax(1) == y).double().mean()
    return float(base - pruned)


def _val(digits, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*digits.batches("val"), strict=True)
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def test_measured_sensitivity_is_the_drop_of_each_group_pruned_alone(mlp, digits):
    rec = load_recipe(_recipe({"prune": {"ratios": [0.0, 0.25, 0.5]}}))
    p = _problem(mlp, digits, rec, lambda s: None)
    try:
        table = S.measure_table(p, lambda s: None)
    finally:
        p.evaluator.close()
    drops = _drops(table)
    assert set(drops) == {(f"prune:{g}", r) for g in (1, 3) for r in (0.25, 0.5)}
    n = len(_val(digits)[1])
    for (name, ratio), measured in drops.items():
        layer = int(name.split(":")[1])
        ref = _reference_drop(mlp, digits, layer, layer + 2, ratio)
        # float32 vs float64 logits may differ on a near tie: at most one sample.
        assert measured == pytest.approx(ref, abs=1.01 / n), (name, ratio)
    assert max(drops.values()) > 2.0 / n  # the reference is not trivially zero
    by_ratio = {s["choice"]: s for s in table["dims"][0]["settings"]}
    assert by_ratio[0.5]["flops_share"] < by_ratio[0.25]["flops_share"] < 1.0


def test_shape_caps_each_dimension_at_its_first_setting_over_the_budget():
    space = Space(prune=[Dim("prune:a", [0.0, 0.25, 0.5, 0.75], ["a"]),
                         Dim("prune:b", [0.25, 0.5], ["b"])],
                  quant=[Dim("bits:c", ["float", 8, 4], ["c"])])
    table = {"metric": "top1", "base": 0.9, "dims": [
        {"name": "prune:a", "settings": [{"choice": 0.25, "drop": 0.001},
                                         {"choice": 0.5, "drop": 0.05},  # over: the cap
                                         {"choice": 0.75, "drop": 0.002}]},  # noise: capped
        {"name": "prune:b", "settings": [{"choice": 0.25, "drop": 0.3},
                                         {"choice": 0.5, "drop": 0.4}]},
        {"name": "bits:c", "settings": [{"choice": 8, "drop": 0.0},
                                        {"choice": 4, "error": "ModelError: NaN"}]}]}
    shaped, rows = S.shape(space, table, 0.01, enabled=True)
    assert [d.choices for d in shaped.dims()] == [[0.0, 0.25], [0.25], ["float", 8]]
    assert [d.choices for d in space.dims()][0] == [0.0, 0.25, 0.5, 0.75]  # a copy
    why = {r["name"]: [(e["choice"], e["why"]) for e in r["excluded"]] for r in rows}
    assert why["prune:a"][0] == (0.5, "drop alone 0.05 > budget 0.01")
    assert why["prune:a"][1] == (0.75, "more aggressive than 0.5, which is excluded")
    assert why["prune:b"] == [(0.5, "drop alone 0.4 > budget 0.01")]
    assert rows[1]["note"] == "every setting is over the budget; the mildest, 0.25, is kept"
    assert why["bits:c"] == [(4, "failed alone (ModelError: NaN)")]
    unshaped, rows = S.shape(space, table, 0.01, enabled=False)
    assert [d.choices for d in unshaped.dims()] == [d.choices for d in space.dims()]
    assert all(not r["excluded"] for r in rows)
    # Seeds: each dimension at its most aggressive kept setting under each threshold.
    seeds = S.seeds(shaped, table, 0.01, 3)  # thresholds 0.01/2 ... 0.01
    assert seeds == [{"prune:a": 0.25, "bits:c": 8}]  # one distinct allocation
    # Without a budget: quantiles of the drops (0.002, 0.3); past a setting over the
    # threshold (or failed) nothing more aggressive is taken.
    assert S.seeds(unshaped, table, None, 2) == [
        {"prune:a": 0.25, "prune:b": 0.25, "bits:c": 8},
        {"prune:a": 0.75, "prune:b": 0.25, "bits:c": 8}]


def test_a_group_over_the_budget_is_kept_out_and_guided_trials_come_first(mlp, digits,
                                                                          tmp_path: Path):
    ratios = [0.0, 0.25, 0.5, 0.75]
    rec = load_recipe(_recipe({"prune": {"ratios": ratios}}))
    p = _problem(mlp, digits, rec, lambda s: None)
    try:
        drops = _drops(S.measure_table(p, lambda s: None))
    finally:
        p.evaluator.close()
    a, b = drops[("prune:1", 0.75)], drops[("prune:3", 0.75)]
    assert a != b
    budget = (a + b) / 2  # one group's most aggressive setting is over it, the other's not
    result = search(mlp, digits, _recipe({"trials": 7, "prune": {"ratios": ratios}},
                                         max_accuracy_drop=100 * budget), tmp_path / "s", **QUIET)
    sens = result["sensitivity"]
    assert sens["budget"] == pytest.approx(budget) and sens["shaped"] and not sens["cached"]
    allowed = {}
    for name in ("prune:1", "prune:3"):
        cap = next((r for r in ratios[1:] if drops[(name, r)] > budget), None)
        allowed[name] = [r for r in ratios if cap is None or r < cap]
        row = next(r for r in sens["dims"] if r["name"] == name)
        assert row["kept"] == allowed[name]
        assert [e["choice"] for e in row["excluded"]] == [r for r in ratios
                                                          if r not in allowed[name]]
        # The same measurement, stopped past the cap (what it excludes is not measured).
        measured = {s["choice"]: s["drop"] for s in row["drops"] if "metric" in s}
        assert measured == {r: drops[(name, r)] for r in ratios[1:]
                            if cap is None or r <= cap}
    assert 0.75 not in allowed["prune:1" if a > b else "prune:3"]
    params = [t["params"] for t in result["trials"]]
    assert all(t[n] in allowed[n] for t in params for n in allowed)  # sampled ones too
    # The guided allocations are the first trials (the last one, threshold = budget, puts
    # every group at its most aggressive allowed ratio), then the uniform ones, capped.
    seeds = sens["seeds"]
    assert seeds and seeds[-1] == {n: max(v) for n, v in allowed.items()}
    uniform = []
    for r in ratios:
        alloc = {n: max(c for c in v if c <= r) for n, v in allowed.items()}
        if alloc not in seeds + uniform:
            uniform.append(alloc)
    assert params[:len(seeds) + len(uniform)] == (seeds + uniform)[:7]


def test_sensitivity_is_measured_once_and_reused_on_resume(mlp, digits, tmp_path: Path,
                                                           monkeypatch):
    calls = []
    real = S.measure_table

    def counted(p, log):
        calls.append(1)
        return real(p, log)

    monkeypatch.setattr(S, "measure_table", counted)
    rec = _recipe({"trials": 3, "prune": {"ratios": [0.0, 0.5]}}, max_accuracy_drop=5.0)
    first = search(mlp, digits, rec, tmp_path / "s", **QUIET)
    assert calls == [1] and (tmp_path / "s" / S.FILE).is_file()
    logs: list[str] = []
    more = {**rec, "search": {**rec["search"], "trials": 4}}
    resumed = search(mlp, digits, more, tmp_path / "s", log=logs.append)
    assert calls == [1] and resumed["sensitivity"]["cached"]
    assert any("reused from" in line for line in logs)
    assert [t["params"] for t in resumed["trials"][:3]] == [t["params"]
                                                            for t in first["trials"]]
    assert resumed["sensitivity"]["dims"] == first["sensitivity"]["dims"]
    # Without the file (a worker on another machine): the study's copy is used.
    (tmp_path / "s" / S.FILE).unlink()
    again = search(mlp, digits, more, tmp_path / "s", **QUIET)
    assert calls == [1] and again["sensitivity"]["source"] == "the study's storage"
    assert (tmp_path / "s" / S.FILE).is_file()
    # Another recipe (another fingerprint) is measured anew; --overwrite removes the cache.
    search(mlp, digits, more, tmp_path / "s", overwrite=True, trials=1, **QUIET)
    assert calls == [1, 1]


def test_switched_off_gives_the_search_without_it(mlp, digits, tmp_path: Path):
    assert load_recipe(_recipe({"sensitivity": False})).search.sensitivity is None
    assert SearchConfig(sensitivity=True).sensitivity.seeds == 3
    rec = _recipe({"trials": 4, "prune": {"ratios": [0.0, 0.5, 0.75]}, "sensitivity": None},
                  max_accuracy_drop=0.01)  # a budget every setting would break
    result = search(mlp, digits, rec, tmp_path / "s", **QUIET)
    assert result["sensitivity"] is None and not (tmp_path / "s" / S.FILE).exists()
    params = [t["params"] for t in result["trials"]]
    assert params[:3] == [{"prune:1": r, "prune:3": r} for r in (0.0, 0.5, 0.75)]
    assert result["space"]["prune:1"]["choices"] == [0.0, 0.5, 0.75]
