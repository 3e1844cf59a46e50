"""The command line: every command, --json output, and one-line errors with exit code 2."""

import json
import os
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
        "the published schema is stale: run slimkit schema --out recipe.schema.json"


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
