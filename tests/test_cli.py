"""The command line: every command, --json output, and one-line errors with exit code 2."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimkit.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "lenet300"
    assert main(["train", "zoo:lenet300", "--data", "builtin:digits", "--out", str(out),
                 "--epochs", "3", "--json"]) == 0
    return out


def test_train_inspect_eval_bench_export(trained: Path, capsys, tmp_path: Path):
    code, out, _ = run(capsys, "inspect", str(trained), "--json")
    info = json.loads(out)
    assert code == 0 and info["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert info["size_bytes"] > 4 * info["params"] and info["history"][0]["kind"] == "train"
    assert [r["name"] for r in info["layers"]][:1] and info["macs"] > 0

    code, out, _ = run(capsys, "eval", str(trained), "--data", "builtin:digits", "--json")
    acc = json.loads(out)
    assert code == 0 and acc["top1"] > 0.85 and acc["top5"] >= acc["top1"]

    code, out, _ = run(capsys, "bench", str(trained), "--batch", "1", "--batch", "4",
                       "--repeats", "3", "--json")
    lat = json.loads(out)
    assert code == 0 and lat["threads"] == 1
    assert lat["onnxruntime"]["4"]["model"]["median_ms"] > 0 and "1" in lat["torch"]

    onnx_file = tmp_path / "m.onnx"
    code, out, _ = run(capsys, "export", str(trained), "--out", str(onnx_file), "--json")
    assert code == 0 and json.loads(out)["parity"]["ok"] and onnx_file.is_file()
    code, _, err = run(capsys, "export", str(trained), "--out", str(onnx_file))
    assert code == 2 and "already exists" in err

    # The ONNX file itself can be inspected, evaluated and benchmarked.
    code, out, _ = run(capsys, "eval", str(onnx_file), "--data", "builtin:digits", "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(acc["top1"], abs=1e-3)
    code, out, _ = run(capsys, "inspect", str(onnx_file), "--json")
    assert code == 0 and json.loads(out)["ops"]["Gemm"] == 3


def test_compress_from_cli(trained: Path, capsys, tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: {max_accuracy_drop: 60, min_size_ratio: 3}\n"
                      "stages:\n  - {kind: magnitude_prune, sparsity: 0.85,"
                      " finetune: {epochs: 1}}\n"
                      "measure: {batch_sizes: [1, 8], repeats: 3, warmup: 1}\n")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "compress", str(trained), "--data", "builtin:digits",
                          "--recipe", str(recipe), "--out", str(out), "--json")
    result = json.loads(stdout)
    assert code == 0 and result["comparison"]["size_ratio"] > 3
    assert (out / "report.html").is_file() and (out / "model.onnx").is_file()
    code, _, err = run(capsys, "compress", str(trained), "--data", "builtin:digits",
                       "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "compress", str(trained), "--data", "builtin:digits",
                       "--recipe", str(recipe), "--out", str(out), "--resume")
    assert code == 2 and " ".join(err.split()) == (
        f"error: output '{out}' holds a finished run, whose checkpoints were removed when it "
        "succeeded: there is nothing to resume; pass --overwrite to run it again")
    recipe.write_text(recipe.read_text().replace("min_size_ratio: 3", "min_size_ratio: 1000"))
    code, stdout, _ = run(capsys, "compress", str(trained), "--data", "builtin:digits",
                          "--recipe", str(recipe), "--out", str(out), "--overwrite")
    assert code == 3 and "target MISSED" in stdout  # finished, outputs written, target missed
    assert json.loads((out / "report.json").read_text())["verdict"]["met"] is False


@pytest.mark.parametrize("args, message", [
    (["inspect", "no/such/model"], "model 'no/such/model' not found"),
    (["inspect", "zoo:lenet"], "unknown zoo model 'lenet'"),
    (["eval", "zoo:lenet300", "--data", "builtin:mnistt"], "'mnistt'. Did you mean 'mnist'"),
    (["compress", "zoo:lenet300", "--recipe", "RECIPE", "--out", "OUT"], "sparsty"),
])
def test_errors_are_one_line_with_exit_code_2(args, message, capsys, tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stages: [{kind: magnitude_prune, sparsty: 0.5}]\n")
    args = [a.replace("RECIPE", str(recipe)).replace("OUT", str(tmp_path / "o")) for a in args]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_npz_data_from_cli(capsys, tmp_path: Path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 64), np.float32), y=np.arange(9))
    code, _, err = run(capsys, "eval", "zoo:lenet300", "--data", str(path))
    assert code == 2 and "d.npz" in err


def test_schema_and_entry_point(tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "slimkit.cli", "schema"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "magnitude_prune" in json.loads(proc.stdout)["$defs"][
        "MagnitudePruneConfig"]["properties"]["kind"]["const"]
    proc = subprocess.run([sys.executable, "-m", "slimkit.cli", "inspect", "missing.pt2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_data_that_does_not_fit_is_one_line(trained: Path, capsys):
    for cmd in ("eval", "inspect", "bench"):
        code, _, err = run(capsys, cmd, str(trained), "--data", "builtin:mnist")
        assert code == 2 and "shape (1, 28, 28) but model" in err, (cmd, err)
        assert len(err.strip().splitlines()) == 1


def test_published_schema_file_is_current():
    # A fresh process: the tests register stage kinds of their own in this one.
    proc = subprocess.run([sys.executable, "-m", "slimkit.cli", "schema"], capture_output=True,
                          text=True, timeout=120)
    path = Path(__file__).parents[1] / "recipe.schema.json"
    assert json.loads(path.read_text()) == json.loads(proc.stdout), \
        "the published schema is stale: run slimkit schema --out recipe.schema.json --overwrite"


def test_pack_and_unpack_from_cli(trained: Path, capsys, tmp_path: Path):
    slim = tmp_path / "m.slim"
    code, out, err = run(capsys, "pack", str(trained), "--out", str(slim), "--json")
    assert code == 0, err
    assert slim.is_file() and slim.stat().st_size < (trained / "weights.safetensors").stat().st_size
    code, _, err = run(capsys, "unpack", str(slim), "--out", str(tmp_path / "back"), "--json")
    assert code == 0, err
    code, out, _ = run(capsys, "eval", str(tmp_path / "back"), "--data", "builtin:digits",
                       "--json")
    assert code == 0 and json.loads(out)["top1"] > 0.5
    slim.write_bytes(slim.read_bytes()[:-20])
    code, _, err = run(capsys, "unpack", str(slim), "--out", str(tmp_path / "bad"))
    assert code == 2 and "m.slim" in err


def _two_stage_recipe(path: Path) -> Path:
    path.write_text("stages:\n"
                    "  - {kind: magnitude_prune, sparsity: 0.5, finetune: {epochs: 1}}\n"
                    "  - {kind: magnitude_prune, sparsity: 0.8}\n"
                    "measure: {batch_sizes: [1], repeats: 2, warmup: 0}\n")
    return path


def test_checkpoints_are_removed_after_success_unless_kept(trained: Path, capsys,
                                                          tmp_path: Path):
    recipe = _two_stage_recipe(tmp_path / "r.yaml")
    out = tmp_path / "out"
    args = ["compress", str(trained), "--data", "builtin:digits", "--recipe", str(recipe),
            "--out", str(out)]
    code, stdout, _ = run(capsys, *args)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model", "model.onnx", "report.html",
                                                     "report.json"]
    assert re.search(r"removed the checkpoints of the finished run \(\d+\.\d MiB\); "
                     r"--keep-checkpoints keeps them", " ".join(stdout.split()))
    text = (out / "report.json").read_text()
    assert ".slimkit-run" not in text and ".slimkit-run" not in (out / "report.html").read_text()
    # The stage before the last was exported and timed before its files went.
    stage0 = json.loads(text)["stages"][0]["measure"]["latency"]["onnxruntime"]["1"]
    assert stage0["median_ms"] > 0

    # A finished run without checkpoints is still slimkit's: --overwrite replaces it.
    code, _, err = run(capsys, *args, "--overwrite", "--keep-checkpoints")
    assert code == 0, err
    assert sorted(p.name for p in (out / ".slimkit-run").iterdir()) == [
        "baseline", "baseline.onnx", "stage-00", "stage-00-train", "stage-00.onnx", "stage-01",
        "state.json"]


def _killed_then_resumed(capsys, model: str, tmp_path: Path) -> tuple[Path, int, str, str]:
    """A two-stage compress run of ``model`` killed after its first stage, then resumed:
    the output folder, and the resumed command's exit code, stdout and stderr."""
    import torch
    from tests.faults._job import dying_at

    class Killed(BaseException):
        pass

    def die() -> None:
        raise Killed

    recipe = _two_stage_recipe(tmp_path / "r.yaml")
    out = tmp_path / "out"
    args = ["compress", model, "--data", "builtin:digits", "--recipe", str(recipe),
            "--out", str(out)]
    with dying_at("stage-00", die), pytest.raises(Killed):
        main(args)
    capsys.readouterr()
    state = json.loads((out / ".slimkit-run" / "state.json").read_text())
    assert [s["index"] for s in state["stages"]] == [0]
    torch.rand(3)  # the process's random state moves on; a resumed run must not depend on it
    return out, *run(capsys, *args, "--resume")


def test_a_zoo_model_run_resumes(capsys, tmp_path: Path):
    """zoo:NAME has random initial weights: drawn from --seed, the resumed command builds the
    same model, so its run is recognised (it was refused as another model's before)."""
    import torch

    _, code, stdout, err = _killed_then_resumed(capsys, "zoo:lenet5", tmp_path)
    assert code == 0, err
    assert "stage 1 magnitude_prune: finished in an earlier run (resuming after it)" in \
        " ".join(stdout.split())

    from slimkit.cli import _load

    def weights(seed: int) -> list[torch.Tensor]:
        torch.rand(1)
        return list(_load("zoo:lenet5", None, seed, False)[0].module.state_dict().values())

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    before = torch.random.get_rng_state()
    _load("zoo:lenet5", None, 0, False)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream untouched


def test_a_resumed_run_removes_its_checkpoints_when_it_succeeds(trained: Path, capsys,
                                                               tmp_path: Path):
    out, code, stdout, err = _killed_then_resumed(capsys, str(trained), tmp_path)
    assert code == 0, err
    assert "stage 1 magnitude_prune: finished in an earlier run (resuming after it)" in \
        " ".join(stdout.split())
    assert not (out / ".slimkit-run").exists()
    assert [s["index"] for s in json.loads((out / "report.json").read_text())["stages"]] == \
        [0, 1]


def test_pack_says_it_is_lossy_and_what_it_cost(trained: Path, capsys, tmp_path: Path):
    slim = tmp_path / "m.slim"
    code, out, err = run(capsys, "pack", str(trained), "--out", str(slim), "--data",
                         "builtin:digits")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert re.fullmatch(rf"wrote {re.escape(str(slim))} \([\d,]+ bytes, \d+\.\d\dx smaller "
                        r"than float32, \d\.\d\d bits per shared weight\)", lines[0])
    assert lines[1] == ("lossy: 3 weight tensors clustered here by k-means without fine-tuning "
                        "(fc1.weight, fc2.weight, fc3.weight); an encode stage in a recipe "
                        "fine-tunes the shared weights instead")
    before, after, delta = re.fullmatch(
        r"top-1 on 359 test samples of builtin:digits: (\d+\.\d\d)% before packing, "
        r"(\d+\.\d\d)% after \(([+-]\d+\.\d\d) points\)", lines[2]).groups()
    assert float(delta) == pytest.approx(float(after) - float(before), abs=0.011)
    code, out, _ = run(capsys, "pack", str(trained), "--out", str(tmp_path / "n.slim"))
    assert code == 0
    assert out.strip().splitlines()[-1] == "pass --data to measure the accuracy the " \
        "clustering costs"


def test_schema_out_refuses_an_existing_file_without_overwrite(capsys, tmp_path: Path):
    path = tmp_path / "schema.json"
    path.write_text("mine")
    code, _, err = run(capsys, "schema", "--out", str(path))
    assert code == 2 and path.read_text() == "mine"
    assert " ".join(err.split()) == (f"error: output '{path}' already exists; pass "
                                     "--overwrite to replace it")
    code, out, _ = run(capsys, "schema", "--out", str(path), "--overwrite")
    assert code == 0 and out == f"wrote {path}\n"
    assert "magnitude_prune" in json.loads(path.read_text())["$defs"]["MagnitudePruneConfig"][
        "properties"]["kind"]["const"]


def test_bench_counts_one_thread_in_the_singular(trained: Path, capsys):
    code, out, _ = run(capsys, "bench", str(trained), "--batch", "2", "--threads", "1",
                       "--repeats", "1")
    assert code == 0 and out.count("(1 thread)") == 2 and "threads)" not in out


@pytest.mark.parametrize("command", [None, "train", "inspect", "bench", "eval", "compress",
                                     "export", "pack", "unpack", "schema", "demo"])
def test_help_shows_flags_without_a_value_placeholder(command, capsys):
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0 and "<bool>" not in out
    if command == "compress":
        def after(option: str) -> str:  # what the help shows right after the option
            return re.search(rf"^│ [ *]+{option} +(\S+)", out, re.M).group(1)

        assert [after(f) for f in ("--overwrite", "--resume", "--keep-checkpoints", "--json")] \
            == ["Replace", "Continue", "Keep", "Print"]
        assert after("--out") == "<path>"  # an option that takes a value still shows its type
