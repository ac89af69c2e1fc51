"""The progress bar's line, its ETA, and what it draws on a terminal and in a log (no stack)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

from loadgen import progress
from loadgen.progress import Progress, ProgressDisplay, bar_line, eta_s, status_line


def test_the_bar_line_shows_every_count() -> None:
    p = Progress(total=40, sent=15, done=12, failed=2, refused=1)
    line = bar_line(p, 12.4, 20.0, 1.5, label="sled x2", width=10)
    assert line == ("sled x2 [###.......] 12/40  3 in flight  2 failed (1 refused)  "
                    "0:12 ETA 0:20  1.50 req/s")
    assert bar_line(Progress(total=3, sent=3, done=3), 61, 0.0, None, width=4) == \
        "[####] 3/3  0 in flight  0 failed (0 refused)  1:01 ETA 0:00  ? req/s"
    assert "ETA ?" in bar_line(Progress(total=0), 0, None, None)  # an empty run draws, full


def test_the_log_line_keeps_its_shape() -> None:
    p = Progress(total=8, sent=3, done=2, failed=0)
    assert status_line(p, 6.1) == "[loadgen]    6.1 s  sent 3/8  done 2  failed 0"
    p.failed = p.refused = 1
    assert status_line(p, 6.1).endswith("failed 1 (1 refused)")


def test_eta_follows_the_arrivals_then_the_completion_rate() -> None:
    sending = Progress(total=10, sent=4, done=3)
    assert eta_s(sending, elapsed_s=2.0, span_s=9.0, rps=5.0) == 7.0  # the last arrival at 9 s
    assert eta_s(sending, elapsed_s=12.0, span_s=9.0, rps=5.0) == 0.0  # late: not negative
    draining = Progress(total=10, sent=10, done=6)
    assert eta_s(draining, elapsed_s=10.0, span_s=9.0, rps=2.0) == 2.0  # 4 in flight at 2/s
    closed = Progress(total=10, sent=5, done=4)
    assert eta_s(closed, elapsed_s=3.0, span_s=None, rps=2.0) == 3.0  # 6 left at 2/s
    assert eta_s(closed, elapsed_s=3.0, span_s=None, rps=0.0) is None  # nothing done yet
    assert eta_s(Progress(total=2, sent=2, done=2), 1.0, None, None) == 0.0


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


async def _show(display: ProgressDisplay, p: Progress, seconds: float) -> None:
    task = asyncio.create_task(display.run(p, time.perf_counter(), span_s=1.0))
    await asyncio.sleep(seconds)
    p.sent = p.done = 1
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # the quiet one has already returned
        await task
    display.close()


async def test_a_terminal_gets_one_line_redrawn_and_cleared(monkeypatch) -> None:
    monkeypatch.setattr(progress, "REDRAW_S", 0.01)
    stream = FakeStream(tty=True)
    await _show(ProgressDisplay(stream, label="wisp"), Progress(total=2), 0.05)
    out = stream.getvalue()
    assert "\n" not in out and out.count("\r") >= 3
    assert "wisp [" in out and "1/2" in out
    assert out.endswith("\r\x1b[K")  # cleared: the next line starts at column 0


async def test_a_log_gets_periodic_lines_or_nothing() -> None:
    stream = FakeStream(tty=False)
    await _show(ProgressDisplay(stream, every_s=0.02), Progress(total=2), 0.05)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("[loadgen]") for line in lines)
    assert "\r" not in stream.getvalue()
    quiet = FakeStream(tty=False)
    await _show(ProgressDisplay(quiet, lines=False, every_s=0.02), Progress(total=2), 0.05)
    assert quiet.getvalue() == ""
