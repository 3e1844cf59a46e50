"""Progress of long steps: plain lines only past the threshold, throttled; none when short."""

from __future__ import annotations

import pytest

from slimkit.core import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeClock, list[str]]:
    clock, lines = FakeClock(), []
    monkeypatch.setattr(progress, "clock", clock)
    monkeypatch.setattr(progress, "sink", lines.append)
    monkeypatch.setenv("SLIMKIT_PROGRESS", "plain")
    return clock, lines


def test_short_step_prints_nothing(plain: tuple[FakeClock, list[str]]) -> None:
    clock, lines = plain
    with progress.step("calibration", total=4, unit="batches") as s:
        for _ in range(4):
            clock.now += 0.4  # 1.6 s in all: under the threshold
            s.advance()
    assert lines == []


def test_long_step_prints_throttled_lines_and_a_total(plain: tuple[FakeClock, list[str]]
                                                      ) -> None:
    clock, lines = plain
    with progress.step("calibration", total=30, unit="batches") as s:
        for _ in range(30):
            clock.now += 1.0
            s.advance(loss=0.5)
    # a line once the threshold passed (at 2 s), then every EVERY_S (12, 22), then the total
    assert len(lines) == 4, lines
    assert lines[0].startswith("[slimkit] calibration, 2/30 batches (7%)")
    assert "~28 s left" in lines[0] and "loss 0.5" in lines[0]
    assert lines[1].startswith("[slimkit] calibration, 12/30 batches")
    assert lines[2].startswith("[slimkit] calibration, 22/30 batches")
    assert "done in 30 s" in lines[3] and "30/30 batches (100%)" in lines[3]
    assert "1 batches/s" in lines[3]


def test_step_without_advance_reports_its_total_time(plain: tuple[FakeClock, list[str]]
                                                     ) -> None:
    clock, lines = plain
    with progress.step("ONNX export"):
        clock.now += 75.0
    assert lines == ["[slimkit] ONNX export, done in 1 min 15 s"]


def test_counted_advances_per_call(plain: tuple[FakeClock, list[str]]) -> None:
    clock, lines = plain
    with progress.step("search", unit="trials") as s:
        fn = s.counted(lambda r: r * 2)
        clock.now += 3.0
        assert fn(2) == 4
        assert fn(3) == 6
    assert s.done == 2
    assert lines[0].startswith("[slimkit] search, 1 trials")


def test_off_disabled_and_failed_steps_are_silent(plain: tuple[FakeClock, list[str]]) -> None:
    clock, lines = plain
    with progress.mode(False), progress.step("timing", total=2) as s:
        clock.now += 50.0
        s.advance()
    with progress.step("timing", total=2, enabled=False) as s:
        clock.now += 50.0
        s.advance()
    with pytest.raises(KeyboardInterrupt), progress.step("timing") as s:
        clock.now += 50.0
        raise KeyboardInterrupt
    assert lines == []


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMKIT_PROGRESS", "auto")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress.current_mode() == "plain"
    with progress.mode("rich"):
        assert progress.current_mode() == "rich"
        with progress.mode(True):
            assert progress.current_mode() == "rich"
        with progress.mode(False):
            assert progress.current_mode() == "off"
    assert progress.current_mode() == "plain"
    with pytest.raises(ValueError, match="use one of"), progress.mode("loud"):
        pass


def test_rich_bar_shares_the_console_with_a_training_bar(
        plain: tuple[FakeClock, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from rich import get_console
    from rich.errors import LiveError
    from rich.progress import Progress

    clock, lines = plain
    monkeypatch.setenv("SLIMKIT_PROGRESS", "rich")
    with Progress(transient=True), progress.step("calibration", total=3,
                                                 unit="batches") as s:  # under a training bar
        clock.now += 5.0
        s.advance()
        assert s.shown == "rich" and s._bar.console is get_console()
    assert len(lines) == 1 and lines[0].startswith("[slimkit] calibration, 1/3 batches")
    assert "done in 5 s" in lines[0]

    def refuse(_live: object) -> bool:  # rich < 14.1 allows one live display per console
        raise LiveError("Only one live display may be active at once")

    monkeypatch.setattr(get_console(), "set_live", refuse)
    with progress.step("calibration", total=3, unit="batches") as s:
        clock.now += 5.0
        s.advance()
        assert s.shown == "plain"
    assert lines[1].startswith("[slimkit] calibration, 1/3 batches (33%)")
