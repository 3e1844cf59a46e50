"""Training without a terminal prints periodic plain lines: step/total, rate, loss, epochs."""

from __future__ import annotations

import re

import pytest
from tests.conftest import make_mlp

from slimkit.core import progress
from slimkit.train.loop import TrainConfig, fit


def test_fit_prints_plain_progress_lines_without_a_terminal(digits,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    ticks = iter(range(0, 100_000))
    monkeypatch.setattr(progress, "clock", lambda: float(next(ticks)))  # 1 s per reading
    lines: list[str] = []
    monkeypatch.setattr(progress, "sink", lines.append)
    monkeypatch.setenv("SLIMKIT_PROGRESS", "plain")
    fit(make_mlp(), digits, TrainConfig(epochs=2, batch_size=100, lr=1e-3), label="train mlp")
    steps = [ln for ln in lines if re.match(r"\[slimkit\] train mlp, \d+/28 steps", ln)]
    assert steps, lines
    assert all(re.search(r"steps/s|s each", ln) and "loss " in ln for ln in steps)
    assert [ln for ln in lines if ": epoch " in ln][:2] == [
        ln for ln in lines if re.match(r"\[slimkit\] train mlp: epoch [12], loss ", ln)]
    assert lines[-1].startswith("[slimkit] train mlp, 28/28 steps (100%)")
    assert "done in" in lines[-1]


def test_fit_is_silent_when_progress_is_off(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(0, 100_000))
    monkeypatch.setattr(progress, "clock", lambda: float(next(ticks)))
    lines: list[str] = []
    monkeypatch.setattr(progress, "sink", lines.append)
    monkeypatch.setenv("SLIMKIT_PROGRESS", "plain")
    fit(make_mlp(), digits, TrainConfig(epochs=1, batch_size=100), progress=False)
    with progress.mode("off"):
        fit(make_mlp(), digits, TrainConfig(epochs=1, batch_size=100))
    assert lines == []
