"""A hostile or careless recipe is refused at load, on one line, with its key path.

Issue 16, item 7: every value is checked before any model or data is touched. One rule on
every config (floats finite, booleans are not numbers, integers fit 64 bits), bounds where a
value is absurd, at least one stage, and a YAML reader that refuses duplicate keys, runaway
nesting and alias bombs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimkit.core.errors import ConfigError
from slimkit.distill.config import LogitKD
from slimkit.pipeline.recipe import load_recipe
from slimkit.train.config import TrainConfig

STAGE = {"kind": "magnitude_prune", "sparsity": 0.5}
INF, NAN = float("inf"), float("nan")


def _recipe(**top) -> dict:
    return {"stages": [dict(STAGE)], **top}


def _stage(**keys) -> dict:
    return {"stages": [{**STAGE, **keys}]}


def _error(source) -> str:
    with pytest.raises(ConfigError) as err:
        load_recipe(source)
    return str(err.value)


@pytest.mark.parametrize("recipe, message", [
    (_recipe(measure={"batch_sizes": [0]}),
     "measure.batch_sizes.0: Input should be greater than or equal to 1"),
    (_recipe(measure={"batch_sizes": [1 << 20]}),
     "measure.batch_sizes.0: Input should be less than or equal to 65536"),
    (_recipe(measure={"batch_sizes": [True]}),
     "measure.batch_sizes.0: expected a number, got the boolean true"),
    (_recipe(measure={"parity_atol": INF}), "measure.parity_atol: Input should be a finite number"),
    (_recipe(measure={"parity_atol": 1e30}),
     "measure.parity_atol: Input should be less than or equal to 1"),
    (_recipe(measure={"repeats": 10**12}),
     "measure.repeats: Input should be less than or equal to 10000"),
    (_recipe(seed=2**63), "seed: 9223372036854775808 does not fit in 64 bits (|value| < 2**63)"),
    (_recipe(seed=-1), "seed: Input should be greater than or equal to 0"),
    (_recipe(seed=True), "seed: expected a number, got the boolean true"),
    (_recipe(target={"min_size_ratio": INF}), "target.min_size_ratio: Input should be a finite "
                                              "number"),
    (_recipe(target={"max_accuracy_drop": NAN}),
     "target.max_accuracy_drop: Input should be a finite number"),
    (_recipe(target={"max_accuracy_drop": 1000}),
     "target.max_accuracy_drop: Input should be less than or equal to 100"),
    (_recipe(target={"min_speedup": {"value": INF}}),
     "target.min_speedup.value: Input should be a finite number"),
    (_stage(finetune={"lr": INF}), "stages.0.finetune.lr: Input should be a finite number"),
    (_stage(finetune={"lr": True}),
     "stages.0.finetune.lr: expected a number, got the boolean true"),
    (_stage(finetune={"lr": 1e6}),
     "stages.0.finetune.lr: Input should be less than or equal to 10"),
    (_stage(finetune={"epochs": 1e12}),
     "stages.0.finetune.epochs: Input should be less than or equal to 10000"),
    (_stage(finetune={"epochs": True}),
     "stages.0.finetune.epochs: expected a number, got the boolean true"),
    (_stage(finetune={"max_steps": 10**12}),
     "stages.0.finetune.max_steps: Input should be less than or equal to 100000000"),
    (_stage(sparsity=True), "stages.0.sparsity: expected a number, got the boolean true"),
    ({"stages": [{"kind": "structured_prune", "target": {"flops": INF}}]},
     "stages.0.target.flops: Input should be a finite number"),
    # a union member's type tag never shows in the key path; the members' reasons are joined
    ({"stages": [{"kind": "structured_prune", "ratio": 0.5, "blocks": NAN}]},
     "stages.0.blocks: Input should be a finite number or Input should be 'auto'"),
    ({"stages": []}, "stages: List should have at least 1 item after validation, not 0"),
])
def test_bad_values_are_refused_with_their_key_path(recipe, message):
    assert _error(recipe) == f"invalid recipe: {message}"


def test_the_number_rule_holds_for_every_config_and_on_assignment():
    with pytest.raises(ValueError, match="expected a number, got the boolean true"):
        TrainConfig(lr=True)
    with pytest.raises(ValueError, match="Input should be a finite number"):
        LogitKD(temperature=INF)
    cfg = TrainConfig()
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        cfg.seed = 2**64
    assert TrainConfig(lr=1, epochs=2.0).lr == 1.0  # ints for floats, whole floats for ints


def test_yaml_values_and_the_published_recipes_still_load(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - {kind: magnitude_prune, sparsity: 0.5,"
                    " finetune: {lr: 1e-3, epochs: 2}}\nseed: 7\n")
    recipe = load_recipe(path)
    assert recipe.stages[0].finetune.lr == pytest.approx(1e-3) and recipe.seed == 7
    demo = Path(__file__).parents[2] / "src" / "slimkit" / "recipes" / "demo.yaml"
    assert load_recipe(demo).stages


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - kind: magnitude_prune\n    sparsity: 0.5\n    sparsity: 0.9\n",
     "duplicate key 'stages.0.sparsity' at line 4 (first at line 3); keep one"),
    ("stages: [{kind: magnitude_prune, sparsity: 0.5}]\nseed: 1\nseed: 2\n",
     "duplicate key 'seed' at line 3 (first at line 2); keep one"),
    ('{"stages": [{"kind": "magnitude_prune", "sparsity": 0.5, "sparsity": 0.6}]}',
     "duplicate key 'stages.0.sparsity' at line 1 (first at line 1); keep one"),
    ("stages: " + "[" * 100 + "]" * 100 + "\n",
     "'stages' is nested more than 64 levels deep (line 1); a recipe needs only a few"),
    ("stages: &s [*s]\n",
     "'stages' is nested more than 64 levels deep (line 1); a recipe needs only a few"),
])
def test_yaml_structure_is_refused_before_it_is_built(tmp_path: Path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert _error(path) == f"recipe '{path}': {message}"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nstages: [*a7]\n")
    assert _error(path) == (f"recipe '{path}' expands to more than 100,000 values (through YAML "
                            "aliases?); write the recipe out plainly")


def test_recursion_deeper_than_the_parser_is_one_line(tmp_path: Path):
    path = tmp_path / "deep.yaml"
    path.write_text("stages: " + "[" * 5000 + "]" * 5000 + "\n")
    assert _error(path) == (f"recipe '{path}' is nested too deeply (a recipe needs at most 64 "
                            "levels)")


@pytest.mark.parametrize("data, message", [
    (b"stages: [\n", "is not valid YAML/JSON: expected the node content, but found "
                     "'<stream end>' at line 2, column 1 (while parsing a flow node); fix the "
                     "syntax there"),
    (b"stages:\n  - kind: a: b\n", "is not valid YAML/JSON: mapping values are not allowed "
                                    "here at line 2, column 12; fix the syntax there"),
    (b"stages: [{kind: magnitude_prune}]\nname: \xff\xfe\n",
     "is not UTF-8 text (byte 0xff at offset 40); save it as UTF-8"),
    (b"stages: \x00\n", "is not valid YAML/JSON: it holds the control character #x0000 at "
                        "offset 8; a recipe is plain text"),
])
def test_unreadable_text_is_one_line(tmp_path: Path, data: bytes, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    error = _error(path)
    assert error == f"recipe '{path}' {message}" and "\n" not in error


def test_empty_recipe_and_a_folder_as_recipe(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("# nothing\n")
    assert _error(path) == f"invalid recipe '{path}': it is empty; a recipe needs at least 'stages'"
    assert _error(tmp_path) == (f"recipe '{tmp_path}' is not a regular file; give a YAML or JSON "
                                "file")


def test_rebuilding_the_recipe_model_does_not_stack_number_guards():
    """Every recipe load builds a Recipe class; the number guard must wrap each int/float
    once, not once more per build (the nesting grew until a RecursionError in long runs)."""
    from slimkit.pipeline.recipe import recipe_model, recipe_schema

    def depth(schema, seen=0):
        if isinstance(schema, dict):
            own = 1 if schema.get("type") == "function-wrap" else 0
            return max([seen + own] + [depth(v, seen + own) for v in schema.values()])
        if isinstance(schema, list):
            return max([seen] + [depth(v, seen) for v in schema])
        return seen

    first = depth(recipe_model().__pydantic_core_schema__)
    for _ in range(30):
        recipe_model()
    assert depth(recipe_model().__pydantic_core_schema__) == first
    recipe_schema()  # still builds
