"""Child processes that die with the process that started them.

Every process `wisp up` starts (nats-server, redis-server, each service) is spawned by
`spawn`, so one rule holds for all of them: when this process dies, however it dies (SIGKILL
included), the kernel sends each child SIGTERM (Linux `prctl(PR_SET_PDEATHSIG)`), and no
child is left running without its parent.

PR_SET_PDEATHSIG is tied to the *thread* that forked the child, not to the process: the
signal fires as soon as that thread exits. Callers spawn from threads that come and go (tests
call `Stack.restart` through `asyncio.to_thread`, whose pool threads retire when idle), and a
child forked on such a thread would be killed when the thread retires. So every fork happens
on one daemon thread that lives exactly as long as the process (`_Spawner`); the calling
thread only waits for it.

Each child also gets its own session (`start_new_session=True`): a Ctrl-C in the terminal
reaches only `wisp up`, which then stops its children in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGTERM  # services drain on it; the servers exit on it

_POLL_S = 0.05


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    # Resolved once here: the forked child must not dlopen/dlsym (nor import) anything.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """The `preexec_fn` of every child: runs in the child between fork and exec."""
    prctl, sig = _prctl, int(PARENT_DEATH_SIGNAL)

    def preexec() -> None:
        # Only a foreign call and two syscalls: between fork and exec the child must not
        # take a lock that another thread of the parent may have held at fork time.
        if prctl is None:
            return
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork() and prctl(): then no signal will ever
        # come, and the child is already an orphan (re-parented, so getppid() changed).
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class _Spawner:
    """One long-lived daemon thread that runs every fork (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] | None = None
        self._pid = -1

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        with self._lock:
            # After os.fork() the child has a copy of this object but not the thread.
            if self._jobs is None or self._pid != os.getpid():
                self._jobs = queue.SimpleQueue()
                self._pid = os.getpid()
                threading.Thread(target=self._serve, args=(self._jobs,), name="wisp-spawner",
                                 daemon=True).start()
            jobs = self._jobs
        future: Future[Any] = Future()
        jobs.put((future, fn))
        return future

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]]) -> None:
        # A daemon thread that never returns: it ends only with the process, which is
        # exactly when the children should get their PDEATHSIG.
        while True:
            future, fn = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)


_SPAWNER = _Spawner()


def spawn(cmd: Sequence[str], **popen_kw: Any) -> subprocess.Popen[bytes]:
    """Start `cmd` (`subprocess.Popen` arguments) as a child that gets SIGTERM when this
    process dies, in its own session. Safe to call from any thread."""
    if "preexec_fn" in popen_kw:
        raise TypeError("spawn() sets preexec_fn itself")
    popen_kw.setdefault("start_new_session", True)
    preexec = _die_with_parent(os.getpid())
    future = _SPAWNER.submit(lambda: subprocess.Popen(list(cmd), preexec_fn=preexec,
                                                      **popen_kw))
    try:
        return future.result()
    except BaseException:
        # Interrupted (Ctrl-C) while the spawner was forking: the child may exist already,
        # and nobody else knows its pid. Wait for the fork to finish, then end the child.
        proc = _result_despite_interrupts(future)
        if proc is not None:
            stop(proc, timeout_s=0)
        raise


def _result_despite_interrupts(future: Future[Any]) -> Any:
    while True:
        try:
            return future.result()
        except KeyboardInterrupt:
            continue
        except BaseException:
            return None


def stop(proc: subprocess.Popen[Any], timeout_s: float,
         hurry: Callable[[], bool] | None = None) -> bool:
    """SIGTERM `proc` and wait up to `timeout_s` for it to exit; SIGKILL it after that, or as
    soon as `hurry()` turns true. Always reaps it. Returns True if it had to be killed."""
    if proc.poll() is not None:
        return False
    killed = False
    if timeout_s > 0 and not (hurry and hurry()):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline and not (hurry and hurry()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_POLL_S)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        killed = True
    proc.wait()
    return killed


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22),
    or None if there is no such process: with the pid, it names one process, even after the
    pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])
