from pathlib import Path

import pytest

from slimkit.core.errors import ConfigError
from slimkit.pipeline.recipe import load_recipe, recipe_schema
from slimkit.pipeline.verdict import judge

GOOD = {"target": {"max_accuracy_drop": 1.0, "min_speedup": {"value": 2, "batch": 8}},
        "stages": [{"kind": "magnitude_prune", "sparsity": 0.5, "finetune": {"epochs": 1}}]}


def test_valid_recipe_from_yaml_file(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - kind: magnitude_prune\n    sparsity: 0.25\n"
                    "target:\n  min_size_ratio: 2\n")
    recipe = load_recipe(path)
    assert recipe.stages[0].sparsity == 0.25 and recipe.target.min_size_ratio == 2
    assert recipe.measure.batch_sizes == [1, 32]
    assert load_recipe(GOOD).target.min_speedup.runtime == "onnxruntime"


@pytest.mark.parametrize("recipe, message", [
    ({"stages": [{"kind": "magnitude_prun", "sparsity": 0.5}]},
     "stages.0.kind: unknown value 'magnitude_prun'. Did you mean 'magnitude_prune'?"),
    ({"stages": [{"kind": "magnitude_prune", "sparsty": 0.5}]},
     "stages.0.sparsty: unknown key. Did you mean 'sparsity'?"),
    ({"stages": [{"kind": "magnitude_prune", "sparsity": 1.5}]},
     "stages.0.sparsity: Input should be less than 1"),
    ({"stages": [{"kind": "magnitude_prune", "sparsity": 0.5, "finetune": {"lr": 1, "epoch": 2}}]},
     "stages.0.finetune.epoch: unknown key. Did you mean 'epochs'?"),
    (GOOD | {"targt": {}}, "targt: unknown key. Did you mean 'target'?"),
    (GOOD | {"measure": {"float": 1}}, "measure.float: unknown key."),
    (GOOD | {"target": {"min_speedup": {"value": 2, "runtime": "tvm"}}},
     "target.min_speedup.runtime: Input should be 'onnxruntime' or 'torch'"),
    ({"stages": []}, "stages: List should have at least 1 item after validation, not 0"),
    ({"target": {}}, "stages: Field required"),
    ([1, 2], "expected a mapping"),
])
def test_bad_recipes_name_the_key_path_and_closest_name(recipe, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe) if isinstance(recipe, dict) else load_recipe(str(recipe))
    assert message in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(bad)
    assert str(err.value) == (f"recipe '{bad}' is not valid YAML/JSON: expected the node "
                              "content, but found '<stream end>' at line 2, column 1 (while "
                              "parsing a flow node); fix the syntax there")
    with pytest.raises(ConfigError, match="recipe file .*nope.yaml' does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_schema_lists_stage_kinds_and_documents_fields():
    schema = recipe_schema()
    assert "MagnitudePruneConfig" in schema["$defs"]
    props = schema["$defs"]["MagnitudePruneConfig"]["properties"]
    assert props["sparsity"]["description"] and props["kind"]["const"] == "magnitude_prune"
    assert schema["$defs"]["Target"]["additionalProperties"] is False


def test_verdict_met_missed_and_margins():
    recipe = load_recipe(GOOD | {"target": {"max_accuracy_drop": 1.0, "min_size_ratio": 4,
                                            "min_speedup": {"value": 2, "batch": 8}}})
    base = {"accuracy": {"top1": 0.95}}
    final = {"accuracy": {"top1": 0.945}}
    cmp = {"size_ratio": 3.0, "onnxruntime": {"8": {"speedup": 2.5}}}
    v = judge(recipe.target, base, final, cmp)
    by_name = {c["name"]: c for c in v["criteria"]}
    assert by_name["max_accuracy_drop"]["achieved"] == pytest.approx(0.5)
    assert by_name["max_accuracy_drop"]["met"] and by_name["max_accuracy_drop"]["margin"] == \
        pytest.approx(0.5)
    assert not by_name["min_size_ratio"]["met"]
    assert by_name["min_size_ratio"]["margin"] == pytest.approx(-1.0)
    assert by_name["min_speedup (onnxruntime, batch 8)"]["met"]
    assert v["met"] is False
    assert judge(load_recipe({"stages": GOOD["stages"]}).target, base, final, cmp)["met"] is True


def test_parity_is_a_criterion_whatever_the_target():
    recipe = load_recipe({**GOOD, "target": {"min_size_ratio": 2}})
    cmp = {"size_ratio": 3.0}
    ok = judge(recipe.target, {}, {}, cmp,
               parity={"max_abs_diff": 2e-5, "atol": 1e-4, "ok": True, "batch": 8})
    assert ok["met"] and ok["criteria"][-1] == {
        "name": "max_onnx_diff", "asked": 1e-4, "achieved": 2e-5, "met": True,
        "margin": pytest.approx(8e-5), "unit": ""}
    bad = judge(recipe.target, {}, {}, cmp,
                parity={"max_abs_diff": 1.19, "atol": 0.055, "ok": False, "batch": 8})
    assert bad["met"] is False and bad["criteria"][-1]["met"] is False
    assert bad["criteria"][0]["met"]  # the size target alone was met
    untargeted = judge(load_recipe({"stages": GOOD["stages"]}).target, {}, {}, {},
                       parity={"max_abs_diff": 1.19, "atol": 0.055, "ok": False, "batch": 8})
    assert untargeted["met"] is False and untargeted["note"] == "the recipe sets no target"
