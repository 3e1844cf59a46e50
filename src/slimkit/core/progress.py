"""Progress of long steps: a rich bar on a terminal, plain throttled log lines otherwise.

Calibration, a pruning target search, the final measurement or a training epoch can each take
minutes. A step says what it is doing with :func:`step`; nothing is shown for a step that
ends within :data:`THRESHOLD_S` seconds, so short steps (and the test suite) stay quiet.

* ``rich`` (stderr is a terminal): a transient bar, drawn once the step has run for the
  threshold; a live display already on screen (a training bar) takes plain lines instead.
* ``plain`` (a log file, CI, a pipe): one line when the step has run for the threshold, then
  one every :data:`EVERY_S` seconds, and a last line with the total time.
* ``off``: nothing (``--json`` output, ``compress(progress=False)``, tests).

The mode comes from ``SLIMKIT_PROGRESS`` (``auto``, ``rich``, ``plain``, ``off``), else
``auto``; :func:`mode` overrides it for a block.

Example:
    >>> with step("calibration", total=8) as s:
    ...     for batch in batches:
    ...         run(batch)
    ...         s.advance()
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

#: A step shorter than this (seconds) shows nothing.
THRESHOLD_S = 2.0
#: Seconds between two plain lines of one step.
EVERY_S = 10.0
MODES = ("auto", "rich", "plain", "off")

#: Monotonic clock in seconds; tests replace it with a fake one.
clock: Callable[[], float] = time.monotonic
_overrides: list[str] = []
T = TypeVar("T")


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


#: Where plain lines go (one call per line).
sink: Callable[[str], None] = _stderr_line


def current_mode() -> str:
    """The mode in force: the innermost :func:`mode` block, else ``SLIMKIT_PROGRESS``, with
    ``auto`` resolved to ``rich`` on a terminal and ``plain`` otherwise."""
    chosen = _overrides[-1] if _overrides else os.environ.get("SLIMKIT_PROGRESS", "auto")
    chosen = chosen if chosen in MODES else "auto"
    if chosen == "auto":
        return "rich" if sys.stderr.isatty() else "plain"
    return chosen


@contextlib.contextmanager
def mode(name: str | bool) -> Iterator[None]:
    """Use progress mode ``name`` inside the block (``True`` keeps the current one, ``False``
    is ``off``); blocks nest."""
    if name is True:
        yield
        return
    name = "off" if name is False else name
    if name not in MODES:
        raise ValueError(f"progress mode '{name}': use one of {', '.join(MODES)}")
    _overrides.append(name)
    try:
        yield
    finally:
        _overrides.pop()


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s"


class Step:
    """One long step: count work done with :meth:`advance`; shown as the mode says."""

    def __init__(self, name: str, total: int | None, unit: str, shown: str,
                 done: int = 0) -> None:
        self.name, self.total, self.unit, self.shown = name, total, unit, shown
        self.done = self._first = done
        self.info: dict[str, Any] = {}
        self.start = clock()
        self._last_line: float | None = None
        self._bar: Any = None
        self._task: Any = None

    def advance(self, n: int = 1, **info: Any) -> None:
        """``n`` more units done; ``info`` (``loss=0.31``) is shown beside the count."""
        self.done += n
        self.info.update(info)
        self._show()

    def say(self, text: str) -> None:
        """A line about the step now (an epoch's summary), once it has run past the
        threshold."""
        if self.shown != "off" and clock() - self.start >= THRESHOLD_S:
            if self._bar is not None:
                self._bar.console.print(f"{self.name}: {text}")
            else:
                sink(f"[slimkit] {self.name}: {text}")

    def counted(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` that advances the step by one after each call (a search's trials)."""
        def call(*args: Any, **kwargs: Any) -> T:
            out = fn(*args, **kwargs)
            self.advance()
            return out
        return call

    def line(self, final: bool = False) -> str:
        """The plain text of the step now: name, count, rate, time, info."""
        elapsed = clock() - self.start
        parts = [self.name]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})")
        elif self.done:
            parts.append(f"{self.done} {self.unit}")
        if self.done > self._first and elapsed > 0:
            rate = (self.done - self._first) / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s each")
        parts.append(("done in " if final else "") + _fmt_s(elapsed))
        if not final and self.total and self._first < self.done < self.total:
            left = elapsed * (self.total - self.done) / (self.done - self._first)
            parts.append(f"~{_fmt_s(left)} left")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in self.info.items()]
        return ", ".join(parts)

    def _show(self) -> None:
        now = clock()
        if self.shown == "off" or now - self.start < THRESHOLD_S:
            return
        if self.shown == "rich" and self._start_bar():
            self._bar.update(self._task, completed=self.done, total=self.total,
                             description=self._describe())
            return
        finishing = self.total is not None and self.done >= self.total  # close() says it
        if not finishing and (self._last_line is None or now - self._last_line >= EVERY_S):
            self._last_line = now
            sink(f"[slimkit] {self.line()}")

    def _describe(self) -> str:
        info = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in self.info.items())
        return self.name + (f" ({info})" if info else "")

    def _start_bar(self) -> bool:
        """Draw the rich bar (on rich's console, as the training bar); False (plain lines
        from now on) when another live display is on screen."""
        if self._bar is not None:
            return True
        from rich import get_console
        from rich.errors import LiveError
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}" if self.total
                                  else "{task.completed}"),
                       TimeElapsedColumn(), console=get_console(), transient=True)
        try:
            bar.start()
        except LiveError:
            self.shown = "plain"
            return False
        self._bar, self._task = bar, bar.add_task(self._describe(), total=self.total)
        return True

    def close(self, failed: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
        took_long = clock() - self.start >= THRESHOLD_S
        if self.shown != "off" and took_long and not failed:
            sink(f"[slimkit] {self.line(final=True)}")


@contextlib.contextmanager
def step(name: str, total: int | None = None, unit: str = "steps",
         enabled: bool = True, done: int = 0) -> Iterator[Step]:
    """A long step named ``name`` of ``total`` units (None: unknown), shown as the mode says.

    Args:
        name: what is being done, for people ("calibration", "timing 3 models").
        total: how many units the step has, when known.
        unit: what a unit is ("batches", "trials").
        enabled: False silences this step whatever the mode.
        done: units already done before (a resumed run), counted in the total, not the rate.

    Yields:
        The :class:`Step`; call ``advance()`` after each unit.
    """
    s = Step(name, total, unit, current_mode() if enabled else "off", done)
    failed = True
    try:
        yield s
        failed = False
    finally:
        s.close(failed)


__all__ = ["EVERY_S", "MODES", "THRESHOLD_S", "Step", "current_mode", "mode", "step"]
