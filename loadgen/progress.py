"""A run's progress on stderr: a bar redrawn in place on a terminal, a periodic line otherwise.

On a terminal one line is redrawn with ``\\r`` (done/total as a bar, in flight, failed, refused
by admission control, elapsed, ETA, completed req/s over the last few seconds); piped into a
log, redrawing would leave hundreds of half lines, so a plain line is written every few seconds
instead (or nothing, for the commands that print one line per load point themselves).
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Progress", "ProgressDisplay", "bar_line", "eta_s", "status_line"]

RATE_WINDOW_S = 5.0  # "current" req/s: completions over this window, not since the start
REDRAW_S = 0.25  # the bar's refresh period: smooth enough, cheap on the event loop


@dataclass(slots=True)
class Progress:
    """Counts the runner updates as requests go out and come back."""

    total: int
    sent: int = 0
    done: int = 0
    failed: int = 0
    refused: int = 0  # of the failed: refused at session open (admission control, overloaded)

    @property
    def in_flight(self) -> int:
        return self.sent - self.done


def eta_s(p: Progress, elapsed_s: float, span_s: float | None, rps: float | None) -> float | None:
    """Seconds left. Open loop (`span_s`: the workload's last arrival offset): while requests
    are still to be sent, the time until the last one's arrival (the run cannot end sooner);
    after that, or in a closed loop (`span_s` None), what is left at the current rate. None
    when it cannot be told (nothing completed yet)."""
    if span_s is not None and p.sent < p.total:
        return max(0.0, span_s - elapsed_s)
    left = p.in_flight if span_s is not None else p.total - p.done
    if left <= 0:
        return 0.0
    return left / rps if rps else None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def bar_line(p: Progress, elapsed_s: float, eta: float | None, rps: float | None, *,
             label: str = "", width: int = 24) -> str:
    """One line for a terminal: ``sled x2 [#######.........] 12/40  3 in flight  1 failed
    (1 refused)  0:12 ETA 0:20  1.50 req/s``."""
    filled = width * p.done // p.total if p.total else width
    bar = "#" * filled + "." * (width - filled)
    rate = "? req/s" if rps is None else f"{rps:.2f} req/s"
    return (f"{label + ' ' if label else ''}[{bar}] {p.done}/{p.total}  {p.in_flight} in flight"
            f"  {p.failed} failed ({p.refused} refused)  {_clock(elapsed_s)} ETA {_clock(eta)}"
            f"  {rate}")


def status_line(p: Progress, elapsed_s: float, *, label: str = "loadgen") -> str:
    """The periodic line of a log (no terminal)."""
    refused = f" ({p.refused} refused)" if p.refused else ""
    return (f"[{label}] {elapsed_s:6.1f} s  sent {p.sent}/{p.total}  done {p.done}  "
            f"failed {p.failed}{refused}")


class ProgressDisplay:
    """Draws a :class:`Progress` while :meth:`run` runs (as a task, cancelled at the end),
    then :meth:`close` clears the bar so the next line starts clean. ``lines=False``: nothing
    when the stream is not a terminal."""

    def __init__(self, stream: TextIO | None = None, *, label: str = "", lines: bool = True,
                 every_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.lines = lines
        self.every_s = every_s
        self._drawn = False

    async def run(self, p: Progress, start: float, span_s: float | None) -> None:
        """`start`: the run's ``time.perf_counter`` origin; `span_s`: see :func:`eta_s`."""
        if not self.tty and not self.lines:
            return
        history: collections.deque[tuple[float, int]] = collections.deque([(start, 0)])
        while True:
            await asyncio.sleep(REDRAW_S if self.tty else self.every_s)
            now = time.perf_counter()
            history.append((now, p.done))
            while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_S:
                history.popleft()
            (t0, done0) = history[0]
            rps = (p.done - done0) / (now - t0) if now > t0 else None
            if self.tty:
                line = bar_line(p, now - start, eta_s(p, now - start, span_s, rps), rps,
                                label=self.label)
                self.stream.write("\r" + line + "\x1b[K")  # \x1b[K: erase a longer old line
                self._drawn = True
            else:
                self.stream.write(status_line(p, now - start) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
