"""Ctrl-C in ``slimkit compress``: one line naming the exact command that resumes, exit 130."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

import pytest

from slimkit.cli import main
from slimkit.core.config import SlimConfig
from slimkit.core.record import Record
from slimkit.pipeline import register_stage

#: Off by default: registered stages are run by other tests (the stage contract).
PRESS = {"ctrl_c": False}


class CtrlCConfig(SlimConfig):
    kind: Literal["test_ctrl_c"] = "test_ctrl_c"


@register_stage(CtrlCConfig)
def _ctrl_c(model, cfg, ctx):
    if PRESS["ctrl_c"]:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this stage
    return model.copy(), Record(changed=["nothing"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("interrupt") / "lenet300"
    assert main(["train", "zoo:lenet300", "--data", "builtin:digits", "--out", str(out),
                 "--epochs", "1", "--json"]) == 0
    return str(out)


def _args(tmp_path: Path, out: Path, model: str = "zoo:lenet300") -> list[str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {kind: magnitude_prune, sparsity: 0.5}\n"
                      "  - {kind: test_ctrl_c}\n"
                      "measure: {batch_sizes: [1], repeats: 2, warmup: 0}\n")
    return ["compress", model, "--data", "builtin:digits", "--recipe", str(recipe),
            "--out", str(out), "--json"]


def test_ctrl_c_prints_the_resume_command_which_resumes(trained: str, tmp_path: Path,
                                                        capsys) -> None:
    out = tmp_path / "out dir"  # a space: the printed command must quote it
    PRESS["ctrl_c"] = True
    try:
        assert main(_args(tmp_path, out, trained)) == 130
    finally:
        PRESS["ctrl_c"] = False
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"interrupted; resume with: slimkit compress {trained}")
    command = shlex.split(lines[-1].split("resume with: ", 1)[1])
    assert command[0] == "slimkit" and command[-1] == "--resume"
    assert command[1:-1] == _args(tmp_path, out, trained)
    assert main(command[1:]) == 0  # exactly what was printed
    err = capsys.readouterr().err
    assert "stage 1 magnitude_prune: finished in an earlier run (resuming after it)" in err
    assert (out / "report.json").is_file()


def test_no_resume_is_offered_where_none_can_work(tmp_path: Path) -> None:
    from slimkit.cli import resume_hint

    # no run state in --out (Ctrl-C before the first checkpoint, or an --overwrite run,
    # whose checkpoints go with it): the line says so and gives the command to start again
    hint = resume_hint(["--debug", *_args(tmp_path, tmp_path / "fresh"), "--overwrite"])
    assert hint.startswith("interrupted; nothing to resume in")
    assert "--resume" not in hint and hint.endswith("--json --overwrite")
    assert resume_hint(["train", "zoo:lenet5"]) == "interrupted"


def test_keyboard_interrupt_anywhere_exits_130(monkeypatch: pytest.MonkeyPatch, capsys,
                                               tmp_path: Path) -> None:
    import slimkit.cli as cli

    def press(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_check_out", press)
    assert main(_args(tmp_path, tmp_path / "o")) == 130
    assert "interrupted; nothing to resume" in capsys.readouterr().err
