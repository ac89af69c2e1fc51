"""`wisp up` as an operator runs it: a real `wisp up` process and real children.

No child outlives `wisp up` (SIGKILL included), a second Ctrl-C/SIGTERM while stopping kills
what is left without a traceback or an orphan, and one state directory holds one stack.
Every wait is on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.stack import children
from services.stack.embedded import find_free_port

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 240.0  # four services load the tiny models on a slow CPU
GONE_TIMEOUT_S = 30.0


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Child:
    """One process, named by pid and /proc start time (a reused pid is another process)."""

    name: str
    pid: int
    start_time: int

    def alive(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        state = stat[stat.rindex(")") + 2]
        # A zombie has exited; it only waits for its (new) parent to reap it.
        return state != "Z" and children.process_start_time(self.pid) == self.start_time


def children_of(stack: dict) -> list[Child]:
    procs = {**stack["servers"], **stack["services"]}
    found = [Child(name, p["pid"], p["start_time"]) for name, p in procs.items()]
    assert {"nats-server", "redis-server", "metrics", "admission-scheduler"} <= set(procs)
    assert all(c.alive() for c in found), found
    return found


def assert_all_gone(procs: list[Child], timeout_s: float = GONE_TIMEOUT_S) -> None:
    try:
        wait_until(lambda: not any(c.alive() for c in procs), timeout_s, "the children to end")
    except AssertionError:
        left = [c for c in procs if c.alive()]
        for c in left:  # do not leave them to the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
        raise AssertionError(f"still running {timeout_s:.0f}s later: {left}") from None


class WispUp:
    """`python -m services.cli up` in its own state directory; stderr goes to a file."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.stack_file = state_dir / "stack.json"
        self.err_path = state_dir.parent / f"wisp-up-{id(self)}.stderr"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--state-dir", str(state_dir),
             "--verifiers", "1", "--edges", "1", "--device", "cpu",
             "--metrics-port", str(find_free_port()), *extra],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._err, stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        self.children: list[Child] = []

    @property
    def output(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self) -> dict:
        def ready() -> dict | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"wisp up exited ({self.proc.returncode}):\n{self.output}")
            # Written atomically (rename), so present means complete.
            return json.loads(self.stack_file.read_text()) if self.stack_file.exists() else None

        stack = wait_until(ready, READY_TIMEOUT_S, "stack.json")
        self.children += children_of(stack)
        return stack

    def started_so_far(self) -> list[Child]:
        """The children `wisp up` has reported starting (on stderr) so far."""
        found = []
        for m in re.finditer(r"(?:started (\S+)|(nats-server|redis-server) at \S+) \(pid (\d+)",
                             self.output):
            pid = int(m[3])
            found.append(Child(m[1] or m[2], pid, children.process_start_time(pid)))
        self.children += found
        return found

    def wait_output(self, text: str, timeout_s: float = 60.0) -> None:
        wait_until(lambda: text in self.output or self.proc.poll() is not None, timeout_s,
                   repr(text))
        assert text in self.output, self.output

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"wisp up still running after {timeout_s:.0f}s:\n"
                                 f"{self.output}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its children follow it (PDEATHSIG)
            self.proc.wait()
        self._err.close()
        for c in self.children:  # whatever a failed test left (a SIGSTOPped one ignores TERM)
            if c.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., WispUp]]:
    started: list[WispUp] = []

    def start(*extra: str, state_dir: Path | None = None) -> WispUp:
        up = WispUp(state_dir or tmp_path / ".wisp", *extra)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


# -- the spawning rule itself, without a stack ----------------------------------------------

def test_a_child_outlives_the_short_lived_thread_that_asked_for_it() -> None:
    # PDEATHSIG follows the forking *thread*: a spawn from a thread that then ends must
    # still give a child that lives (the long-lived spawner thread forks it).
    box: list[subprocess.Popen[bytes]] = []
    worker = threading.Thread(target=lambda: box.append(children.spawn(["sleep", "60"])))
    worker.start()
    worker.join()
    proc = box[0]
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)  # a PDEATHSIG would have arrived at once
    finally:
        children.stop(proc, timeout_s=0)
    assert proc.returncode == -signal.SIGKILL


def test_a_child_dies_with_its_parent_killed_by_sigkill(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, threading, time
        from services.stack import children
        box = []
        t = threading.Thread(target=lambda: box.append(children.spawn(["sleep", "60"])))
        t.start(); t.join()
        print(box[0].pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(parent.stdout.readline())
        child = Child("sleep", pid, children.process_start_time(pid))
        assert child.alive()
        parent.kill()
        parent.wait()
        assert_all_gone([child], timeout_s=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


# -- wisp up --------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_of_wisp_up_takes_every_child_down(launch) -> None:
    up = launch()
    up.wait_ready()
    procs = up.children
    assert len(procs) == 7  # nats, redis, metrics, predictor, verifier, scheduler, edge
    up.proc.kill()
    up.proc.wait()
    assert_all_gone(procs)


@pytest.mark.slow
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_second_signal_while_stopping_kills_the_rest_and_leaves_nothing(launch, second):
    up = launch()
    up.wait_ready()
    procs = up.children
    # A service that cannot stop (frozen): the first signal's orderly stop waits on it
    # (edges are stopped first), so the second signal surely lands mid-shutdown.
    stuck = next(c for c in procs if c.name == "edge-drafter-0")
    os.kill(stuck.pid, signal.SIGSTOP)
    up.proc.send_signal(signal.SIGINT)
    up.wait_output("stopping the stack")
    assert up.proc.poll() is None and stuck.alive()
    up.proc.send_signal(second)
    # Well before the 20 s a stuck service is otherwise given to drain.
    code = up.wait_exit(timeout_s=10)
    out = up.output
    assert code == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert f"{second.name} again: killing what is left" in out
    assert out.rstrip().splitlines()[-1].startswith("[wisp up] stack stopped fast: killed "), out
    assert "edge-drafter-0" in out.rstrip().splitlines()[-1]
    assert_all_gone(procs, timeout_s=5)  # reaped by wisp up itself, not by the kernel's rule
    assert not up.stack_file.exists()


@pytest.mark.slow
def test_a_signal_while_starting_stops_what_was_started(launch) -> None:
    up = launch()
    up.wait_output("started edge-drafter-0")  # servers up, services loading their models
    procs = up.started_so_far()
    assert len(procs) == 7, up.output
    up.proc.send_signal(signal.SIGTERM)
    code = up.wait_exit(timeout_s=60)
    out = up.output
    assert code == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    assert out.rstrip().splitlines()[-1] == "wisp: interrupted by SIGTERM while starting", out
    assert_all_gone(procs, timeout_s=5)
    assert not up.stack_file.exists()


@pytest.mark.slow
def test_a_second_stack_on_the_same_state_dir_is_refused(launch, tmp_path: Path) -> None:
    first = launch()
    first.wait_ready()
    procs = first.children
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns)
              for p in (first.stack_file, first.state_dir / "stack.lock")}
    logs_before = sorted((first.state_dir / "logs").iterdir())

    second = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--state-dir", str(first.state_dir),
         "--verifiers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert second.stdout == ""
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert f"pid {first.proc.pid}" in err and "--state-dir" in err, err
    assert str(first.state_dir) in err

    # The first stack is untouched and still serves.
    assert first.proc.poll() is None
    assert all(c.alive() for c in procs)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert sorted((first.state_dir / "logs").iterdir()) == logs_before
    gen = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "def add(a, b):", "--json",
         "--max-new-tokens", "4", "--state-dir", str(first.state_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["stats"]["num_tokens"] == 4

    # One signal: the orderly stop, which releases the state dir for the next stack.
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(timeout_s=60) == 0, first.output
    assert "Traceback" not in first.output
    assert first.output.rstrip().splitlines()[-1] == "[wisp up] stack stopped"
    assert_all_gone(procs, timeout_s=5)
    assert not first.stack_file.exists()
