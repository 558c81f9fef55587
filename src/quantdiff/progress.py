"""Progress of long steps: a live bar on a terminal, one summary line in a log.

tqdm redraws its bar with carriage returns; written to a file (``bash scripts/main.sh > main.log``) every
redraw becomes a frame in the log. Every progress display of quantdiff goes through :class:`Progress`,
which decides where its output goes by looking at the stream:

- a terminal: a tqdm bar, as before;
- anything else (a file, a pipe, CI): nothing while the step runs, then one line when it ends,
  e.g. ``calibrate (trajectory): 64 prompts in 21.3 s``;
- ``enabled=False`` (``--quiet``, ``progress=False`` in the Python API): nothing at all.

:func:`bars_wanted` answers the same question for progress bars drawn by other libraries (the diffusers
pipeline's per-step bar, its component loading bar), which have no summary mode and are simply off when
not on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

Item = TypeVar("Item")


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_wanted(enabled: bool = True, stream: IO[str] | None = None) -> bool:
    """Whether live progress bars should be drawn: wanted and on a terminal."""
    return enabled and is_terminal(stream)


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``83 s``, ``12 min 5 s``: short and readable in a log."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 600:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


class Progress(Generic[Item]):
    """Progress over an iterable or a count, shown as :mod:`this module <quantdiff.progress>` says.

    Use it like tqdm, either as an iterable wrapper::

        for prompt in Progress(prompts, desc="calibrate", unit="prompt", enabled=show):
            ...

    or as a context manager updated by hand::

        with Progress(total=len(prompts), desc="fp", unit="img", enabled=show) as bar:
            bar.update(batch)

    Args:
        iterable: what to iterate over (optional with ``total``).
        desc: what the step is; starts the bar and the summary line.
        total: the number of items (default ``len(iterable)`` where it has one).
        unit: the name of one item, singular (``prompt``, ``call``, ``layer``, ``img``); the summary line
            adds an ``s`` for more than one, except for abbreviations such as ``img`` or ``it``.
        enabled: ``False`` shows nothing at all.
        leave: on a terminal, keep the finished bar (tqdm's ``leave``); in a log the summary line is always
            written.
        stream: where to write (default ``sys.stderr`` at the time of the call).
    """

    def __init__(
        self,
        iterable: Iterable[Item] | None = None,
        *,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        enabled: bool = True,
        leave: bool = True,
        stream: IO[str] | None = None,
    ):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.unit = unit
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.started = time.perf_counter()
        self.closed = False
        self._bar: Any = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=desc, total=self.total, unit=unit, leave=leave, file=self.stream)

    @property
    def mode(self) -> str:
        """``bar`` (a terminal), ``summary`` (a log) or ``off``."""
        return "off" if not self.enabled else "bar" if self._bar is not None else "summary"

    def __iter__(self) -> Iterator[Item]:
        if self.iterable is None:
            raise TypeError("Progress(total=...) without an iterable is updated with update(), not iterated")
        completed = False
        try:
            for item in self.iterable:
                yield item
                self.update()
            completed = True
        finally:
            self._finish(completed)  # a loop left early (an error) writes no summary

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        """Extra text after the bar (terminal only; a log gets only the summary line)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        """End the display: close the bar, or write the summary line."""
        self._finish(True)

    def __enter__(self) -> Progress[Item]:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._finish(kind is None)  # a failing step leaves its error, not a summary, as the last line

    def summary(self) -> str:
        """The line written to a log: ``desc: n units in t s`` (``n/total`` when it stopped early)."""
        count = str(self.n) if self.total is None or self.n == self.total else f"{self.n}/{self.total}"
        unit = self.unit if self.n == 1 or self.unit in _NO_PLURAL else self.unit + "s"
        head = f"{self.desc}: " if self.desc else ""
        return f"{head}{count} {unit} in {format_seconds(time.perf_counter() - self.started)}"

    def _finish(self, write_summary: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and write_summary:
            print(self.summary(), file=self.stream, flush=True)


_NO_PLURAL = frozenset({"it", "img", "B", "s"})


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
