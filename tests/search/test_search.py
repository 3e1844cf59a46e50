"""The compression search: space -> recipe, the study (seeded, resumable, refusing another
run's study), failed trials, the chosen recipe replayed by compress."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, MissingDataError, ResumeError
from slimkit.core.record import Record
from slimkit.io.artifact import load_artifact
from slimkit.pipeline import compress, load_recipe, register_stage
from slimkit.search.config import SearchConfig
from slimkit.search.run import TargetUnreachableError, search
from slimkit.search.space import build_space, candidate_stages
from slimkit.search.study import StorageError

pytest.importorskip("optuna")

FAST = {"threads": 1, "batch_sizes": [1, 8], "warmup": 1, "repeats": 3}
LAT = {"repeats": 3, "warmup": 1, "batch": 8, "runtime": "torch"}


class SearchNanConfig(SlimConfig):
    kind: Literal["test_search_nan"] = "test_search_nan"


@register_stage(SearchNanConfig)
def _nan(model, cfg, ctx):
    model = model.copy()
    with torch.no_grad():
        next(model.module.parameters())[0] = float("nan")
    return model, Record(changed=["first weight row set to NaN"])


def _recipe(search_block: dict | None = None, stages: list | None = None, **target) -> dict:
    out = {"stages": stages or [{"kind": "structured_prune", "ratio": 0.5}],
           "target": target, "measure": FAST}
    if search_block is not None:
        out["search"] = {"latency": LAT, **search_block}
    return out


def test_search_block_is_validated_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"search\.trails: unknown key\. Did you mean 'trials'"):
        load_recipe(_recipe({"trails": 3}))
    with pytest.raises(ConfigError, match=r"search\.prune\.ratios.*\[0, 1\)"):
        load_recipe(_recipe({"prune": {"ratios": [0.5, 1.0]}}))
    with pytest.raises(ConfigError, match="nothing to search"):
        load_recipe(_recipe({"prune": None}))
    assert load_recipe(_recipe()).search is None  # no block: the defaults
    assert SearchConfig().prune.groups == "layer"


def test_candidate_maps_to_per_group_stages_that_prune_exactly_those_groups(mlp, digits):
    cfg = SearchConfig(prune={"ratios": [0.0, 0.25, 0.5]})
    space = build_space(mlp.module, digits.example_inputs(1), cfg, [])
    roots = [d.layers[0] for d in space.prune]
    assert roots == ["1", "3"]  # the two hidden Linear layers; the classifier is fixed
    params = {space.prune[0].name: 0.5, space.prune[1].name: 0.25}
    stages = candidate_stages(space, cfg, params, [{"kind": "ptq"}, {"kind": "lowrank"}])
    assert [(s["kind"], s.get("ratio"), s.get("include")) for s in stages] == [
        ("structured_prune", 0.25, ["3"]), ("structured_prune", 0.5, ["1"]), ("ptq", None, None),
        ("lowrank", None, None)]
    from slimkit.search.objective import build, candidate_recipe

    recipe = candidate_recipe({"stages": [], "measure": FAST}, stages[:2])
    pruned = build(mlp, digits, recipe).module
    assert (pruned[1].out_features, pruned[3].out_features) == (64, 48)  # 128*0.5, 64*0.75
    same = candidate_stages(space, cfg, dict.fromkeys(params, 0.5), [])
    assert [s["include"] for s in same] == [["1", "3"]]  # one stage for one ratio...
    pruned = build(mlp, digits, candidate_recipe({"stages": [], "measure": FAST}, same)).module
    assert (pruned[1].out_features, pruned[3].out_features) == (64, 32)  # ...each group halved


def test_search_writes_a_recipe_that_compress_replays_to_the_same_model(mlp, digits,
                                                                        tmp_path: Path):
    rec = _recipe({"trials": 6, "prune": {"ratios": [0.0, 0.25, 0.5]}, "front": 2},
                  min_size_ratio=1.2)
    result = search(mlp, digits, rec, tmp_path / "s", log=lambda s: None)
    assert len(result["trials"]) == 6 and result.met
    chosen = result["chosen"]
    assert 1 / chosen["measured"]["size_share"] >= 1.2
    written = yaml.safe_load(result.recipe_path.read_text())
    assert "search" not in written and written["stages"] == chosen["recipe"]["stages"]
    report = compress(mlp, digits, load_recipe(written), tmp_path / "c", progress=False,
                      log=lambda s: None)
    assert report["final"]["size_bytes"] == chosen["measured"]["size_bytes"]
    from slimkit.search.objective import build

    rebuilt = build(mlp, digits, load_recipe(written)).module
    replayed = load_artifact(tmp_path / "c" / "model").module
    x = digits.x_test[:64]
    torch.testing.assert_close(replayed(x), rebuilt(x), rtol=0, atol=0)
    assert report["verdict"]["met"] is True
    html = (tmp_path / "s" / "search.html").read_text()
    assert html.count("<svg") == 2 and "hand-written recipe" in html and "chosen" in html
    top = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    top_table, sens_table = (html.split("<h2>Top trials</h2>")[1]
                             .split("<h2>Per-layer sensitivity</h2>"))
    assert top_table.count("<tr><td>") == min(len(top), 10)
    # The sensitivity tier's table: one row per measured dimension, named with its layers.
    dims = result["sensitivity"]["dims"]
    assert sens_table.count("<tr><td>") == len(dims) > 0
    assert all(f"<td>{d['name']}</td><td>{', '.join(d['layers'])}</td>" in sens_table
               for d in dims)


def _params(result) -> list[dict]:
    return [t["params"] for t in result["trials"]]


def test_seeded_search_is_reproducible_and_resumes_where_it_stopped(mlp, digits,
                                                                    tmp_path: Path):
    rec = _recipe({"trials": 5, "prune": {"ratios": [0.0, 0.5, 0.75]}, "front": 1})
    full = search(mlp, digits, rec, tmp_path / "a", log=lambda s: None)
    # The sensitivity-guided allocations first, then the uniform ones (warm start) not
    # among them, then the sampler's own proposals.
    seeds = full["sensitivity"]["seeds"]
    first = seeds + [u for u in ({"prune:1": r, "prune:3": r} for r in (0.0, 0.5, 0.75))
                     if u not in seeds]
    assert seeds and _params(full)[:len(first)] == first[:5]
    again = search(mlp, digits, {**rec, "search": {**rec["search"], "trials": 4}},
                   tmp_path / "b", log=lambda s: None)
    assert _params(again) == _params(full)[:4]
    resumed = search(mlp, digits, rec, tmp_path / "b", log=lambda s: None)  # on to 5 trials
    assert _params(resumed) == _params(full)
    assert [t["values"] for t in resumed["trials"]] == [t["values"] for t in full["trials"]]
    other = {**rec, "seed": 1}
    with pytest.raises(ResumeError, match="created by another run"):
        search(mlp, digits, other, tmp_path / "b", log=lambda s: None)
    fresh = search(mlp, digits, other, tmp_path / "b", overwrite=True, trials=1,
                   log=lambda s: None)
    assert len(fresh["trials"]) == 1


def test_a_crashing_candidate_is_recorded_failed_and_the_search_goes_on(mlp, digits,
                                                                        tmp_path: Path):
    stages = [{"kind": "structured_prune", "ratio": 0.25}, {"kind": "test_search_nan"}]
    rec = _recipe({"trials": 6, "prune": {"ratios": [0.0, 0.25]}, "toggle_stages": True,
                   "front": 1}, stages=stages)
    logs: list[str] = []
    result = search(mlp, digits, rec, tmp_path / "s", log=logs.append)
    states = {t["number"]: t["state"] for t in result["trials"]}
    failed = [t for t in result["trials"] if t["state"] == "FAIL"]
    assert failed and all(t["params"]["stage:1:test_search_nan"] for t in failed)
    assert all("NaN" in t["error"] for t in failed)
    assert any(s == "COMPLETE" for s in states.values())
    assert all(s["kind"] != "test_search_nan" for s in result.recipe["stages"])
    assert any("failed" in line and "going on" in line for line in logs)


def test_an_unreachable_target_gives_the_closest_point(mlp, digits, tmp_path: Path):
    rec = _recipe({"trials": 4, "prune": {"ratios": [0.0, 0.5]}, "front": 1},
                  min_size_ratio=50.0)
    result = search(mlp, digits, rec, tmp_path / "s", log=lambda s: None)
    assert not result.met and "closest" in result["chosen"]["why"]
    best = max(1 / t["measured"]["size_share"] for t in result["trials"] if t["measured"])
    assert 1 / result["chosen"]["measured"]["size_share"] == pytest.approx(best)
    with pytest.raises(TargetUnreachableError, match="no candidate met the target"):
        search(mlp, digits, rec, tmp_path / "s", require_target=True, log=lambda s: None)


def test_bad_inputs_are_one_clear_error(mlp, digits, tmp_path: Path):
    with pytest.raises(MissingDataError, match="search needs data"):
        search(mlp, None, _recipe({}), tmp_path / "s")
    with pytest.raises(StorageError, match=r"cannot be opened.*server runs"):
        search(mlp, digits, _recipe({"trials": 1}), tmp_path / "s",
               storage="postgresql://nobody:secret@127.0.0.1:1/none", log=lambda s: None)


def test_cli_refuses_bad_arguments_before_loading_anything(tmp_path: Path):
    from slimkit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe({})))
    base = ["search", "zoo:lenet300", "--recipe", str(path), "--out", str(tmp_path / "o")]
    assert main([*base, "--data", "builtin:digits", "--storage", "nonsense"]) == 2
    assert main([*base, "--data", "builtin:digits", "--worker"]) == 2
    assert main(base) == 2


def test_amc_clamps_each_layer_so_the_flops_budget_stays_reachable():
    from slimkit.search.amc import AmcSampler, _flops_weights

    choices = [0.0, 0.25, 0.5, 0.75]
    amc = AmcSampler([("a", choices), ("b", choices)], budget=0.5, maximize=True)
    w = {"a": 0.5, "b": 0.5}
    assert amc._floor("a", {}, w) == pytest.approx(0.25)  # b can remove at most 0.375
    assert amc._floor("b", {"a": 0.25}, w) == pytest.approx(0.75)  # 1 - .125 - .375 = .5
    # The FLOPs model: least squares recovers a linear FLOPs law from measured trials.
    rng = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(12):
        a, b = (float(v) for v in torch.rand(2, generator=rng))
        hist.append(({"a": a, "b": b}, None, 1 - 0.7 * a - 0.2 * b))
    fitted = _flops_weights(hist, ["a", "b"])
    assert fitted["a"] == pytest.approx(0.7, abs=1e-9) and fitted["b"] == pytest.approx(0.2,
                                                                                      abs=1e-9)


def test_amc_sampler_searches_under_a_flops_budget(mlp, digits, tmp_path: Path):
    rec = _recipe({"trials": 8, "sampler": "amc", "flops_budget": 0.6, "front": 1,
                   "prune": {"ratios": [0.0, 0.25, 0.5, 0.75]}, "sensitivity": None})
    result = search(mlp, digits, rec, tmp_path / "s", log=lambda s: None)
    assert [t["enqueued"] for t in result["trials"]] == [True] * 4 + [False] * 4
    late = [t for t in result["trials"][4:] if t["measured"]]
    assert late and all(t["measured"]["flops_share"] <= 0.6 for t in late)
    assert result.met and result["chosen"]["measured"]["flops_share"] <= 0.6


def test_cli_search_then_compress_replays_the_chosen_recipe(tmp_path: Path, capsys):
    import json

    from slimkit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe({"trials": 3, "front": 1,
                                            "prune": {"ratios": [0.0, 0.5]}},
                                           min_size_ratio=1.3)))
    common = ["zoo:lenet300", "--data", "builtin:digits", "--json"]
    assert main(["search", *common, "--recipe", str(path), "--out", str(tmp_path / "s")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["chosen"]["met"] and found["outputs"]["recipe"] == str(tmp_path / "s" /
                                                                         "recipe.yaml")
    assert main(["compress", *common, "--recipe", found["outputs"]["recipe"],
                 "--out", str(tmp_path / "c")]) == 0
    replay = json.loads((tmp_path / "c" / "report.json").read_text())
    assert replay["final"]["size_bytes"] == found["chosen"]["measured"]["size_bytes"]
    assert main(["search", *common, "--recipe", str(path), "--out", str(tmp_path / "s"),
                 "--trials", "3", "--require-target"]) == 0  # resumed: nothing left to run
    path.write_text(yaml.safe_dump(_recipe({"trials": 2, "front": 1}, min_size_ratio=99.0)))
    assert main(["search", *common, "--recipe", str(path), "--out", str(tmp_path / "u"),
                 "--require-target"]) == 2



def test_the_readme_search_example_loads():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Automated search", 1)[1]
    block = " ".join(section.split("For example `", 1)[1].split("`", 1)[0].split())
    recipe = load_recipe({"stages": [{"kind": "ptq"}], **yaml.safe_load(block)})
    assert recipe.search.sampler == "nsga2" and recipe.search.finetune.epochs == 1


def test_pareto_keeps_exactly_the_non_dominated_points():
    from slimkit.search.finish import pareto

    rows = [{"values": v} for v in ([0.9, 1.0], [0.8, 0.5], [0.85, 0.7], [0.8, 0.9],
                                     [0.7, 0.5], [0.9, 1.1])]
    front = pareto(rows, [-1.0, 1.0])  # maximize the metric, minimize the time ratio
    assert [r["values"] for r in front] == [[0.9, 1.0], [0.8, 0.5], [0.85, 0.7]]
