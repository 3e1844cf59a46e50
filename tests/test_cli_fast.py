"""The CLI fails fast: help, and every error in the arguments, paths, recipe or in what the recipe
needs from the data, comes before torch (or any model) is loaded.

Each case runs ``slimkit.cli.main`` in a fresh interpreter and reports whether torch was
imported by the time it returned: a cold ``import torch`` alone takes seconds. No wall-clock
times are asserted (the machine is shared); the absence of torch is what makes them fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.core.errors import ConfigError, DataError, MissingDataError
from slimkit.core.stages import STAGE_CONFIGS, STAGES, data_needed
from slimkit.pipeline.recipe import check_data, load_recipe

RUN = """
import json, sys
from slimkit.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""
COMMANDS = ["inspect", "bench", "eval", "train", "compress", "export", "pack", "unpack",
            "schema", "demo", "compare"]


def cli(*args: str, cwd: Path) -> tuple[int, bool, str]:
    """``(exit code, torch imported, stderr)`` of ``slimkit ARGS`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["code"], result["torch"], proc.stderr


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "good.yaml").write_text("stages: [{kind: magnitude_prune, sparsity: 0.5}]\n")
    (tmp_path / "typo.yaml").write_text("stages: [{kind: magnitude_prune, sparsty: 0.5}]\n")
    (tmp_path / "kind.yaml").write_text("stages: [{kind: magnitude_prun, sparsity: 0.5}]\n")
    (tmp_path / "finetune.yaml").write_text(
        "stages: [{kind: magnitude_prune, sparsity: 0.5, finetune: {epochs: 1}}]\n")
    (tmp_path / "ptq.yaml").write_text("stages: [{kind: magnitude_prune, sparsity: 0.5},"
                                       " {kind: ptq}]\n")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "run" / ".slimkit-run").mkdir(parents=True)
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "model.txt").write_text("")
    (tmp_path / "out.onnx").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_loads_no_torch(args: list[str], tmp_path: Path):
    code, torch_loaded, _ = cli(*args, cwd=tmp_path)
    assert code == 0 and not torch_loaded


GOOD = ["--recipe", "good.yaml", "--out", "o"]


@pytest.mark.parametrize(("args", "message"), [
    # the recipe
    (["compress", "zoo:lenet5", "--recipe", "typo.yaml", "--out", "o"],
     "stages.0.sparsty: unknown key. Did you mean 'sparsity'?"),
    (["compress", "zoo:lenet5", "--recipe", "kind.yaml", "--out", "o"], "magnitude_prune"),
    (["compress", "zoo:lenet5", "--recipe", "missing.yaml", "--out", "o"],
     "recipe file 'missing.yaml' does not exist"),
    # what the recipe needs from the data
    (["compress", "zoo:lenet5", "--recipe", "finetune.yaml", "--out", "o"],
     "recipe 'finetune.yaml': stage 1 magnitude_prune: finetune needs data; give --data"),
    (["compress", "zoo:lenet5", "--recipe", "ptq.yaml", "--out", "o"],
     "stage 2 ptq: needs calibration data; give --data"),
    # the model
    (["compress", "no/such.pt2", *GOOD], "model 'no/such.pt2' not found"),
    (["compress", "model.onnx", *GOOD], "compression needs a PyTorch model"),
    (["compress", "model.pt", *GOOD], "is a pickled PyTorch file"),
    (["compress", "model.txt", *GOOD], "unknown model format '.txt'"),
    (["compress", "theirs", *GOOD], "holds neither manifest.json"),
    (["compress", "zoo:lenet5", *GOOD, "--track", "wandb"],
     "track='wandb': slimkit tracks to tensorboard"),
    # the data
    (["compress", "zoo:lenet5", *GOOD, "--data", "builtin:mnistt"],
     "unknown builtin dataset 'mnistt'. Did you mean 'mnist'?"),
    (["compress", "zoo:lenet5", *GOOD, "--data", "no/such.npz"],
     "data path 'no/such.npz' does not exist"),
    # the output
    (["compress", "zoo:lenet5", "--recipe", "good.yaml", "--out", "theirs"],
     "output 'theirs' exists and is not a slimkit run directory"),
    (["compress", "zoo:lenet5", "--recipe", "good.yaml", "--out", "theirs", "--overwrite"],
     "output 'theirs' exists and is not a slimkit run directory"),
    (["compress", "zoo:lenet5", "--recipe", "good.yaml", "--out", "run"],
     "output 'run' already exists; pass --overwrite"),
    (["compress", "zoo:lenet5", "--recipe", "good.yaml", "--out", "model.txt"],
     "is a file, but this command writes a folder"),
    # the other commands
    (["inspect", "no/such.pt2"], "model 'no/such.pt2' not found"),
    (["eval", "zoo:lenet5", "--data", "builtin:mnistt"], "unknown builtin dataset 'mnistt'"),
    (["bench", "no/such.pt2"], "model 'no/such.pt2' not found"),
    (["export", "no/such.pt2", "--out", "m.onnx"], "model 'no/such.pt2' not found"),
    (["export", "zoo:lenet5", "--out", "out.onnx"], "output 'out.onnx' already exists"),
    (["train", "zoo:lenet5", "--data", "nodata", "--out", "o"], "data path 'nodata' does not"),
    (["train", "zoo:lenet5", "--data", "builtin:digits", "--out", "run"],
     "output 'run' already exists"),
    (["demo", "--out", "run"], "output 'run' already exists"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_errors_come_before_torch(args: list[str], message: str, work: Path):
    code, torch_loaded, err = cli(*args, cwd=work)
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not torch_loaded, f"torch was imported before this error: {err}"
    assert not (work / "o").exists()


def test_checks_pass_a_good_command_on_to_the_run(work: Path):
    # a recipe that names a structured criterion validates it in its registry (torch) and
    # still reaches the model: the zoo name is the first thing checked there
    (work / "s.yaml").write_text("stages: [{kind: structured_prune, ratio: 0.3,"
                                 " criterion: l1}]\n")
    code, torch_loaded, err = cli("compress", "zoo:nosuch", "--recipe", "s.yaml", "--out", "o",
                                  cwd=work)
    assert code == 2 and "unknown zoo model 'nosuch'" in err and torch_loaded


def test_stage_configs_are_registered_without_torch_and_match_the_stages():
    code = ("import sys\n"
            "from slimkit.core.stages import STAGE_CONFIGS\n"
            "import slimkit.prune, slimkit.quant, slimkit.lowrank, slimkit.distill,"
            " slimkit.encode, slimkit.io, slimkit.data, slimkit.pipeline, slimkit.train\n"
            "print(' '.join(STAGE_CONFIGS.names()), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    *names, torch_loaded = proc.stdout.split()
    assert torch_loaded == "False", proc.stderr
    builtin = {k for k in STAGES.names() if STAGES.get(k).config.__module__.startswith("slimkit.")}
    assert builtin <= set(names)
    for kind in STAGES.names():
        assert STAGE_CONFIGS.get(kind) is STAGES.get(kind).config


def test_the_technique_modules_listed_register_every_stage_and_rebuilder():
    # technique packages import lazily, so core.stages names the registering modules: a
    # module registering a stage kind or rebuilder that is not listed would be missed
    code = ("import importlib, pkgutil\n"
            "from slimkit.core.stages import REBUILDERS, STAGES\n"
            "first = (STAGES.names(), REBUILDERS.names())\n"
            "for pkg in ('prune', 'quant', 'lowrank', 'distill', 'encode'):\n"
            "    mod = importlib.import_module(f'slimkit.{pkg}')\n"
            "    for m in pkgutil.iter_modules(mod.__path__):\n"
            "        importlib.import_module(f'slimkit.{pkg}.{m.name}')\n"
            "print(first == (STAGES.names(), REBUILDERS.names()), len(first[0]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    same, kinds = proc.stdout.split()
    assert same == "True" and int(kinds) >= 13, proc.stderr


@pytest.mark.parametrize(("stage", "need"), [
    ({"kind": "magnitude_prune", "sparsity": 0.5}, None),
    ({"kind": "magnitude_prune", "sparsity": 0.5, "finetune": {}}, "finetune needs data"),
    ({"kind": "structured_prune", "ratio": 0.3}, None),
    ({"kind": "structured_prune", "ratio": 0.3, "criterion": "taylor"},
     "criterion 'taylor' needs calibration data"),
    ({"kind": "dynamic_quant"}, None),
    ({"kind": "dynamic_quant", "keep_worst": 1}, "need calibration data"),
    ({"kind": "weight_only_quant"}, None),
    ({"kind": "weight_only_quant", "method": "gptq"}, "method 'gptq' needs calibration data"),
    ({"kind": "lowrank"}, None),
    ({"kind": "lowrank", "rank": "sensitivity"}, "rank 'sensitivity' needs calibration data"),
    ({"kind": "ptq"}, "needs calibration data"),
    ({"kind": "qat"}, "needs training data"),
    ({"kind": "distill"}, "needs training data"),
])
def test_what_each_stage_needs_from_the_data(stage: dict, need: str | None):
    recipe = load_recipe({"stages": [stage]})
    got = data_needed(recipe.stages[0])
    assert got is None if need is None else need in got, got
    check_data(recipe, has_data=True)
    if need is None:
        check_data(recipe, has_data=False)
    else:
        with pytest.raises(MissingDataError, match="give --data") as info:
            check_data(recipe, has_data=False)
        assert isinstance(info.value, ConfigError) and isinstance(info.value, DataError)


def test_registry_names_are_still_checked_in_recipes():
    with pytest.raises(ConfigError, match="criterion.*Did you mean 'l1'"):
        load_recipe({"stages": [{"kind": "structured_prune", "ratio": 0.3, "criterion": "l1x"}]})
    with pytest.raises(ConfigError, match="unknown calibration method 'minmx'"):
        load_recipe({"stages": [{"kind": "ptq", "calibration": "minmx"}]})
    with pytest.raises(ConfigError, match="unknown weight quantizer 'lsqq'"):
        load_recipe({"stages": [{"kind": "qat", "weight_quantizer": "lsqq"}]})
    recipe = load_recipe({"stages": [{"kind": "qat", "weight_quantizer": "ternary"}]})
    assert recipe.stages[0].weight_quantizer == "ternary"
