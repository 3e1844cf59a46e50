"""The output folder of a run: its layout, and the rules for creating, resuming, replacing it.

A run writes only the names listed here; anything else in ``--out`` is the user's and is never
deleted. A fresh or ``--overwrite`` run is built in a sibling folder and swapped in only on
success, so a failed run leaves the previous output byte-identical. The checkpoints
(``.slimkit-run``) serve ``--resume`` only: a run that succeeds removes them unless asked to
keep them, and its ``report.json`` then marks the folder as slimkit's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimkit.core.errors import OutputExistsError, ResumeError
from slimkit.core.files import dir_size

RUN_DIR = ".slimkit-run"
STATE = "state.json"
# What a run writes, at the top of --out and inside .slimkit-run; ".NAME.<random>[.tmp]" and
# ".NAME.old" are the temporaries of the atomic writes, ".slimkit-run-removed" the checkpoints
# of a finished run on their way out. Nothing else is ever deleted.
_REMOVED = ".slimkit-run-removed"
#: The early-exit chain (one ONNX file per step and its runner), for early-exit models.
EXITS = "exits"
_OUT_NAMES = (r"model|model\.onnx|report\.json|report\.html|tensorboard|exits|\.slimkit-run"
              r"|\.slimkit-run-removed")
_RUN_NAMES = r"state\.json|baseline(?:\.onnx)?|stage-\d+(?:\.onnx|-train)?"


@dataclass
class RunPaths:
    """Where a run's files end up (``out``) and where they are written (``work``).

    ``work`` is ``out`` itself, or under ``--overwrite`` a sibling that replaces ``out`` only
    when the run succeeds.
    """

    out: Path
    work: Path | None = None
    run: Path = field(init=False)

    def __post_init__(self) -> None:
        self.work = self.work or self.out
        self.run = self.work / RUN_DIR

    @property
    def staged(self) -> bool:
        return self.work != self.out

    def checkpoint(self, index: int) -> Path:
        return self.run / ("baseline" if index < 0 else f"stage-{index:02d}")


def sibling(out: Path, what: str) -> Path:
    """``.NAME.slimkit-<what>`` beside ``out``: the new run of --overwrite, the parked old one."""
    real = out.resolve()
    return real.with_name(f".{real.name}.slimkit-{what}")


def _foreign(directory: Path) -> list[str]:
    """Entries of a run directory that slimkit did not write (symlinks never are ours)."""
    def ours(p: Path, names: str) -> bool:
        return not p.is_symlink() and re.fullmatch(rf"(?:{names})|\.(?:{names})\..+",
                                                   p.name) is not None

    bad = [p.name for p in directory.iterdir() if not ours(p, _OUT_NAMES)]
    run = directory / RUN_DIR
    if run.is_dir() and not run.is_symlink():
        bad += [f"{RUN_DIR}/{p.name}" for p in run.iterdir() if not ours(p, _RUN_NAMES)]
    return sorted(bad)


def finished_run(directory: Path) -> bool:
    """Whether ``directory`` holds a finished run whose checkpoints were removed: no
    ``.slimkit-run``, but the report slimkit writes last."""
    report = directory / "report.json"
    if (directory / RUN_DIR).exists() or report.is_symlink() or not report.is_file():
        return False
    try:
        saved = json.loads(report.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(saved, dict) and "slimkit_version" in saved


def remove_checkpoints(paths: RunPaths, log: Callable[[str], None]) -> None:
    """Delete the checkpoints of a run that succeeded (they serve ``--resume`` only).

    They are first renamed away in one step, so a run killed while deleting them leaves a
    finished output (and a leftover the next ``--overwrite`` clears), never a half-deleted
    state that ``--resume`` would try to continue from.
    """
    doomed = paths.work / _REMOVED
    size = dir_size(paths.run)
    try:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(paths.run, doomed)
    except OSError as exc:  # the run itself succeeded: say so, and leave them
        log(f"could not remove the checkpoints in '{paths.out / RUN_DIR}' ({exc}); the run "
            "is complete, delete them by hand")
        return
    shutil.rmtree(doomed, ignore_errors=True)
    left = f" (some files in '{paths.out / _REMOVED}' could not be deleted)" \
        if doomed.exists() else ""
    log(f"removed the checkpoints of the finished run ({size / 2**20:.1f} MiB){left}; "
        "--keep-checkpoints keeps them")


def _check_ours(directory: Path, what: str = "output") -> None:
    """Refuse to delete ``directory`` unless slimkit wrote all of it.

    Raises:
        OutputExistsError: it is no run directory, or it holds something slimkit did not write.
    """
    if not any(directory.iterdir()):
        return
    if not (directory / RUN_DIR).is_dir() and not finished_run(directory):
        raise OutputExistsError(f"{what} '{directory}' exists and is not a slimkit run "
                                "directory; refusing to touch it, choose another --out")
    foreign = _foreign(directory)
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputExistsError(f"{what} '{directory}' holds files slimkit did not write "
                                f"({listed}); refusing to delete them: move them away or "
                                "choose another --out")


def _tidy_killed_overwrite(out: Path, log: Callable[[str], None]) -> None:
    """Clear what an --overwrite run killed part-way left beside ``out``.

    A killed run leaves its unfinished new output (removed here), or, killed between the two
    renames of the swap, the previous output parked aside (put back when ``out`` is gone).
    """
    new, old = sibling(out, "new"), sibling(out, "old")
    if old.exists() and not out.exists():
        os.replace(old, out)
        log(f"'{out}': put back the previous output, which an --overwrite run killed while "
            f"swapping had parked at '{old}'")
    for leftover in (old, new):
        if leftover.exists():
            _check_ours(leftover, "leftover of a killed --overwrite run")
            shutil.rmtree(leftover)
            log(f"'{out}': removed '{leftover}', left by an --overwrite run that was killed")


def _resumable_state(paths: RunPaths, fingerprint_at: Callable[[int], str],
                     threads: int) -> dict:
    """The saved state of the run in ``paths``, if it is this run (same fingerprint).

    Raises:
        ResumeError: the state is unreadable, or belongs to another model, data, recipe or
            thread count.
    """
    file = paths.run / STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"run state '{file}' is unreadable ({exc}); use --overwrite to start "
                          "over") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise ResumeError(f"run state '{file}' is not a slimkit run state; use --overwrite to "
                          "start over")
    if state.get("fingerprint") == fingerprint_at(threads):
        return state
    was = state.get("threads")
    if isinstance(was, int) and was != threads and state["fingerprint"] == fingerprint_at(was):
        raise ResumeError(
            f"'{paths.out}' was run with {_threads(was)} and this run has {threads}; "
            "the thread count changes the results, so resuming would not reproduce the run. "
            f"Resume with {_threads(was)} (torch.set_num_threads or OMP_NUM_THREADS), or "
            "--overwrite to start over")
    raise ResumeError(f"'{paths.out}' holds a run of a different model, data or recipe; "
                      "refusing to resume it. Use another --out, or --overwrite to start over")


def _threads(n: int) -> str:
    return f"{n} intra-op thread" + ("" if n == 1 else "s")


def _refuse_input_inside(out: Path, source: str) -> None:
    src = Path(source).resolve()
    if src.exists() and (src == out.resolve() or out.resolve() in src.parents):
        raise OutputExistsError(f"output '{out}' would hold or replace the input model "
                                f"'{source}'; choose another --out")


def _exists(out: Path) -> OutputExistsError:
    return OutputExistsError(f"output '{out}' already exists; pass --overwrite to replace it or "
                             "--resume to continue an interrupted run")


def _nothing_to_resume(out: Path) -> OutputExistsError:
    return OutputExistsError(f"output '{out}' holds a finished run, whose checkpoints were "
                             "removed when it succeeded: there is nothing to resume; pass "
                             "--overwrite to run it again")


def check_out(out: Path, overwrite: bool, resume: bool, source: str) -> None:
    """The refusals of :func:`prepare_out` that need no model or data, with nothing touched.

    The CLI calls it before loading torch or the model, so an existing output is reported at
    once; :func:`prepare_out` still decides, with the lock held (a resume is checked there).

    Raises:
        OutputExistsError: ``out`` holds the input model or files slimkit did not write, or is
            a run that neither ``overwrite`` nor ``resume`` allows to touch.
    """
    _refuse_input_inside(out, source)
    if resume and out.is_dir() and finished_run(out):
        raise _nothing_to_resume(out)
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    _check_ours(out)
    if not overwrite:
        raise _exists(out)


def prepare_out(out: Path, fingerprint_at: Callable[[int], str], overwrite: bool,
                 resume: bool, source: str, log: Callable[[str], None]) -> tuple[RunPaths, dict]:
    """Decide between a fresh run, a resume and a replacement; return its paths and state.

    Only what slimkit wrote is ever deleted (a run directory with nothing foreign in it), and
    never a directory that holds the input model. A replacement (``overwrite``) is built in a
    sibling directory and swapped in by :func:`compress` only when it succeeds, so a failed
    run leaves the previous output as it was. Call with the output lock held.
    """
    _refuse_input_inside(out, source)
    _tidy_killed_overwrite(out, log)
    import torch  # here: the checks above and check_out run before torch is loaded

    threads = torch.get_num_threads()
    fresh = {"fingerprint": fingerprint_at(threads), "threads": threads, "stages": []}
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' is a file; --out must be a directory")
    paths = RunPaths(out)
    if not out.exists() or not any(out.iterdir()):
        paths.run.mkdir(parents=True, exist_ok=True)
        return paths, fresh
    if resume and (paths.run / STATE).is_file():
        return paths, _resumable_state(paths, fingerprint_at, threads)
    _check_ours(out)
    if overwrite:
        paths = RunPaths(out, sibling(out, "new"))
        paths.run.mkdir(parents=True)
        log(f"'{out}': building the new run in '{paths.work}'; it replaces the previous output "
            "when it succeeds")
        return paths, fresh
    if resume and [p.name for p in out.iterdir()] == [RUN_DIR]:
        log(f"'{out}': no stage of the earlier run had finished; starting over")
        shutil.rmtree(paths.run)
        paths.run.mkdir()
        return paths, fresh
    if resume and finished_run(out):
        raise _nothing_to_resume(out)
    if resume:
        raise OutputExistsError(f"output '{out}' holds no interrupted run to resume "
                                f"({RUN_DIR}/{STATE} is missing); pass --overwrite to replace it")
    raise _exists(out)
