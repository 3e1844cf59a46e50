"""Every error is one line that names the culprit and says what to do, with exit code 2.

Issue 16, item 9: YAML syntax errors took 3-5 lines; a non-UTF-8 or deeply nested recipe, a
truncated image, ``--data /dev/null`` and an ``--out`` that is a file reached the CLI's
``TypeName: ...`` catch-all. None of these cases trains or loads more than a zoo model.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from slimkit.cli import main


def _fails(capsys, *args: str) -> str:
    code = main(list(args))
    _, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err.strip().removeprefix("error: ")


@pytest.fixture
def recipe(tmp_path: Path):
    def write(data: bytes) -> str:
        path = tmp_path / "r.yaml"
        path.write_bytes(data)
        return str(path)
    return write


@pytest.mark.parametrize("data, message", [
    (b"stages: [\n", "is not valid YAML/JSON: expected the node content, but found "
                     "'<stream end>' at line 2, column 1 (while parsing a flow node); fix the "
                     "syntax there"),
    (b"stages: [{kind: magnitude_prune, sparsity: 0.5}]\nname: \xff\n",
     "is not UTF-8 text (byte 0xff at offset 55); save it as UTF-8"),
    (b"stages: " + b"[" * 5000 + b"]" * 5000, "is nested too deeply (a recipe needs at most 64 "
                                              "levels)"),
])
def test_unreadable_recipes(capsys, tmp_path: Path, recipe, data, message):
    path = recipe(data)
    err = _fails(capsys, "compress", "zoo:lenet300", "--recipe", path,
                 "--out", str(tmp_path / "o"))
    assert err == f"recipe '{path}' {message}"


def test_duplicate_key_and_markup_in_a_message_print_as_written(capsys, tmp_path: Path, recipe):
    path = recipe(b"stages: [{kind: magnitude_prune, sparsity: 0.5}]\n'[red]x': 1\n")
    err = _fails(capsys, "compress", "zoo:lenet300", "--recipe", path,
                 "--out", str(tmp_path / "o"))
    assert err == f"invalid recipe '{path}': [red]x: unknown key."


def test_data_that_is_a_device(capsys):
    err = _fails(capsys, "eval", "zoo:lenet300", "--data", "/dev/null")
    assert err.startswith("data path '/dev/null' is neither a regular file nor a folder (a "
                          "device, pipe or socket?). Accepted: 'builtin:NAME'")


def test_a_truncated_image(capsys, tmp_path: Path):
    image = pytest.importorskip("PIL.Image")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    buf = io.BytesIO()
    image.effect_noise((8, 8), 50).convert("L").save(buf, "PNG")
    bad = tmp_path / "b" / "9.png"
    bad.write_bytes(buf.getvalue()[:-30])  # the header reads; the pixels do not
    err = _fails(capsys, "eval", "zoo:lenet300", "--data", str(tmp_path))
    assert err == f"cannot read image {bad}: image file is truncated; re-save or remove it"


@pytest.mark.parametrize("args", [
    ["compress", "zoo:lenet300", "--recipe", "RECIPE", "--out", "FILE"],
    ["compress", "zoo:lenet300", "--recipe", "RECIPE", "--out", "FILE", "--resume"],
    ["train", "zoo:lenet300", "--data", "builtin:digits", "--out", "FILE", "--overwrite"],
    ["unpack", "FILE", "--out", "FILE"],
])
def test_out_that_is_a_file_where_a_folder_goes(capsys, tmp_path: Path, recipe, args):
    out = tmp_path / "taken"
    out.write_bytes(b"mine")
    path = recipe(b"stages: [{kind: magnitude_prune, sparsity: 0.5}]\n")
    err = _fails(capsys, *[a.replace("RECIPE", path).replace("FILE", str(out)) for a in args])
    assert err == (f"--out '{out}' is a file, but this command writes a folder there; choose "
                   "another --out (slimkit replaces only outputs it wrote)")
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("command", [["export", "zoo:lenet300", "--overwrite"],
                                     ["pack", "zoo:lenet300", "--overwrite"], ["schema"]])
def test_out_under_a_file_or_a_folder_where_a_file_goes(capsys, tmp_path: Path, command):
    taken = tmp_path / "taken"
    taken.write_bytes(b"mine")
    err = _fails(capsys, *command, "--out", str(taken / "x.out"))
    assert err == (f"--out '{taken / 'x.out'}': '{taken}' is a file, so nothing can be written "
                   "under it; choose another --out")
    err = _fails(capsys, *command, "--out", str(tmp_path))
    assert err == (f"--out '{tmp_path}' is a folder, but this command writes one file; give a "
                   "file path inside it instead")
    assert taken.read_bytes() == b"mine"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_pipe_is_never_replaced_or_read(capsys, tmp_path: Path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # stands in for a device: reading it would block, replacing it would break
    err = _fails(capsys, "export", "zoo:lenet300", "--out", str(pipe), "--overwrite")
    assert err == (f"--out '{pipe}' is not a regular file (a device, pipe or socket?); choose "
                   "another --out")
    err = _fails(capsys, "eval", "zoo:lenet300", "--data", str(pipe))
    assert err.startswith(f"data path '{pipe}' is neither a regular file nor a folder")
    assert pipe.is_fifo()


@pytest.mark.parametrize("option, message", [
    (["--lr", "inf"], "lr: Input should be a finite number"),
    (["--epochs", "100000"], "epochs: Input should be less than or equal to 10000"),
])
def test_training_options_are_validated_like_recipes(capsys, tmp_path: Path, option, message):
    err = _fails(capsys, "train", "zoo:lenet300", "--data", "builtin:digits",
                 "--out", str(tmp_path / "o"), *option)
    assert err == f"invalid training options: {message}"
    assert not (tmp_path / "o").exists()


def test_an_unforeseen_failure_while_loading_names_the_model(capsys, monkeypatch):
    import slimkit.io.loader

    def broken(*args, **kwargs):
        raise AttributeError("'list' object has no attribute 'get'\nmore detail")

    monkeypatch.setattr(slimkit.io.loader, "load_model", broken)
    err = _fails(capsys, "inspect", "zoo:lenet5")  # a spec that passes the early path check
    assert err == ("cannot read model 'zoo:lenet5': AttributeError: 'list' object has no "
                   "attribute 'get'; is it damaged or of another kind? (slimkit --debug shows "
                   "the traceback)")


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "zoo:lenet5", "--seed", "-1"],
     "error: Invalid value for '--seed': Input should be greater than or equal to 0 (see "
     "slimkit inspect --help)"),
    (["nosuch"], "error: No such command 'nosuch'. (see slimkit --help)"),
    (["compress"], "error: Missing argument 'model'. (see slimkit compress --help)"),
])
def test_usage_errors_are_one_line_too(args: list[str], message: str, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == message
