"""`wisp up`: the whole stack on one machine, no Docker.

Takes <state-dir>/stack.lock (one stack per state directory), starts a real nats-server
(JetStream) and a real redis-server on free ports unless URLs of running ones are given, then
each service as its own process (logs in <state-dir>/logs), waits until every one answers
/readyz, writes <state-dir>/stack.json so `wisp generate` can find the stack, optionally runs
a demo generation per mode, and on Ctrl-C/SIGTERM stops the services (SIGTERM: they drain)
and then the servers. Every child dies with the launcher's process, however it ends
(`children.spawn`); a second Ctrl-C/SIGTERM while stopping kills what is left (`StopSignals`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from services.stack import children
from services.stack.embedded import EmbeddedInfra, find_free_port

READY_TIMEOUT_S = 180.0  # loading models on a slow CPU takes a while
STOP_SERVERS_TIMEOUT_S = 5.0


@dataclass
class ServiceProcess:
    name: str
    module: str
    args: list[str]
    http_port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


class StackAlreadyRunning(RuntimeError):
    """Another stack holds the state directory's lock."""


class StateDirLock:
    """An exclusive `flock` on <state-dir>/stack.lock, held for a stack's whole life.

    The kernel drops it when the holder's process dies, however it dies, so a lock left by a
    crashed stack never blocks the next one. The file holds the holder's pid (for the error
    message only); it is never deleted, because deleting a lock file lets two processes lock
    two different files of the same name."""

    FILE = "stack.lock"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.FILE
        # Opened without truncating, so a refused contender does not touch the holder's pid;
        # close-on-exec (Python's default), so no child inherits the lock and outlives us.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StackAlreadyRunning(
                f"another `wisp up` (pid {holder}) is already running with state dir "
                f"{state_dir}; stop it, or pass --state-dir DIR to run a second stack") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


class StopSignals:
    """SIGINT and SIGTERM for a process that owns a stack (`wisp up`).

    The first signal raises KeyboardInterrupt in the main thread, but only inside
    `interruptible()` (while the stack starts, runs its demo or serves). Once stopping has
    begun, signals never raise into the cleanup: a further one only makes the stop fast
    (`hurry`): `stop_stack` then SIGKILLs what is still running instead of waiting for it to
    drain, and still reaps every child and stops the servers."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._may_raise = False

    def install(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.received:  # one came while nothing could be interrupted
            raise KeyboardInterrupt
        self._may_raise = True
        try:
            yield
        finally:
            self._may_raise = False

    def stopping(self) -> None:
        """From now on no signal raises."""
        self._may_raise = False

    def hurry(self) -> bool:
        return len(self.received) > 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._may_raise:
            self._may_raise = False
            raise KeyboardInterrupt
        if len(self.received) == 2:
            # os.write, not print: the main thread may be inside a print to stderr, and a
            # buffered stream raises on such a reentrant call.
            text = f"[wisp up] {signal.Signals(signum).name} again: killing what is left\n"
            with contextlib.suppress(OSError):
                os.write(sys.stderr.fileno(), text.encode())


def _never() -> bool:
    return False


@dataclass
class Stack:
    state_dir: Path
    nats_url: str
    redis_url: str
    infra: EmbeddedInfra | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    lock: StateDirLock | None = None
    signals: StopSignals | None = None
    ready: bool = False  # every service answered /readyz and stack.json is written

    @property
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    def service(self, name: str) -> ServiceProcess:
        return next(s for s in self.services if s.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one service abruptly (failure tests) or gracefully (SIGTERM)."""
        svc = self.service(name)
        svc.proc.send_signal(sig)
        svc.proc.wait(30)

    def restart(self, name: str, wait: bool = True) -> None:
        svc = self.service(name)
        if svc.proc and svc.proc.poll() is None:
            self.kill(name, signal.SIGTERM)
        _spawn(svc, self.env)
        if self.ready:
            self.write_stack_file()  # it lists every pid the stack started
        if wait:
            wait_ready(self, only=[svc])

    def describe(self) -> dict:
        """stack.json: where the stack is, and every process it started (a pid with its
        /proc start time names one process even after the pid is reused)."""
        def proc(pid: int | None) -> dict:
            return {"pid": pid, "start_time": children.process_start_time(pid) if pid else None}

        servers = {}
        if self.infra is not None:
            servers = {"nats-server": {**proc(self.infra.nats.pid), "url": self.infra.nats_url},
                       "redis-server": {**proc(self.infra.redis.pid),
                                        "url": self.infra.redis_url}}
        return {"nats_url": self.nats_url, "redis_url": self.redis_url, "pid": os.getpid(),
                "servers": servers,
                "services": {s.name: {**proc(s.proc.pid if s.proc else None), "http": s.url}
                             for s in self.services}}

    def write_stack_file(self) -> None:
        # Atomically: `wisp generate` (or a test) may read it at any moment.
        tmp = self.stack_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        tmp.replace(self.stack_file)


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape a stack (`wisp up` adds its demo options to these)."""
    parser.add_argument("--nats-url", default=None, help="use this NATS instead of starting one")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting one")
    parser.add_argument("--verifiers", type=int, default=1, help="gpu-verifier replicas")
    parser.add_argument("--edges", type=int, default=1, help="edge-drafter processes")
    parser.add_argument("--draft", default=None, help="draft model (default: shipped tiny draft)")
    parser.add_argument("--target", default=None,
                        help="target model (default: shipped tiny target)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="default 9100, else a free one")
    parser.add_argument("--state-dir", default=".wisp", help="logs and stack.json go here")
    parser.add_argument("--batch-policy", default=None,
                        help="the scheduler's batch policy for every mode: fcfs | edf | wisp "
                             "(default auto: wisp for modes wisp and ucb, fcfs for the others)")
    parser.add_argument("--admission", default=None,
                        help="admission control at session open: reject | queue | off "
                             "(default reject)")


def stack_options(**overrides) -> argparse.Namespace:
    """`wisp up`'s options at their defaults, then `overrides` (tests, benchmarks); also
    `extra_env`: environment variables for every service process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="warning")
    add_up_arguments(parser)
    args = parser.parse_args([])
    args.extra_env = {}
    vars(args).update(overrides)
    return args


def plan_services(args) -> list[ServiceProcess]:
    from common.models.loading import DEFAULT_DRAFT, DEFAULT_TARGET

    draft, target = args.draft or DEFAULT_DRAFT, args.target or DEFAULT_TARGET
    common = ["--log-level", args.log_level]
    models = []
    if args.device:
        models += ["--device", args.device]
    services = [ServiceProcess("metrics", "services.metrics", common,
                               args.metrics_port or _port_or_free(9100)),
                # Listed right after metrics: it stops just before it (stop_stack goes in
                # reverse), once the edges and verifiers whose events it learns from are gone.
                ServiceProcess("predictor", "services.predictor", common, find_free_port())]
    for i in range(args.verifiers):
        services.append(ServiceProcess(
            f"gpu-verifier-{i}", "services.gpu_verifier",
            [*common, *models, "--verifier-id", f"v{i}", "--target-model", target],
            find_free_port()))
    scheduling = []
    if args.batch_policy:
        scheduling += ["--policy", args.batch_policy]
    if args.admission:
        scheduling += ["--admission", args.admission]
    services.append(ServiceProcess(
        "admission-scheduler", "services.admission_scheduler",
        [*common, "--target-model", target, "--draft-model", draft, *scheduling],
        find_free_port()))
    for i in range(args.edges):
        services.append(ServiceProcess(
            f"edge-drafter-{i}", "services.edge_drafter",
            [*common, *models, "--draft-model", draft, "--device-id", f"edge{i}"],
            find_free_port()))
    return services


def _port_or_free(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return find_free_port()


def start_stack(args, signals: StopSignals | None = None) -> Stack:
    """Start the stack `args` describes (`open_stack`, then `launch_stack`); on any failure,
    or an interrupt, stop what was started and re-raise."""
    stack = open_stack(args, signals)
    try:
        launch_stack(stack, args)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def open_stack(args, signals: StopSignals | None = None) -> Stack:
    """Claim the state directory (its lock) for a stack; no process starts yet. Raises
    StackAlreadyRunning, without touching anything, if another stack holds it. With
    `signals` (`wisp up`'s), a second signal makes the stop fast; without, a stop drains."""
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return Stack(state_dir, args.nats_url, args.redis_url, lock=StateDirLock(state_dir),
                 signals=signals)


def launch_stack(stack: Stack, args) -> None:
    """Start the servers (unless given) and the services, wait until all are ready, write
    stack.json. Leaves what it started running on failure: the caller stops the stack."""
    # Whatever stack.json is left belongs to a stack that died without stopping.
    stack.stack_file.unlink(missing_ok=True)
    (stack.state_dir / "logs").mkdir(exist_ok=True)
    if not stack.nats_url or not stack.redis_url:
        stack.infra = EmbeddedInfra(stack.state_dir / "servers")
        stack.infra.start()
        stack.nats_url = stack.nats_url or stack.infra.nats_url
        stack.redis_url = stack.redis_url or stack.infra.redis_url
        _say(f"embedded nats-server at {stack.infra.nats_url} (pid {stack.infra.nats.pid}), "
             f"redis-server at {stack.infra.redis_url} (pid {stack.infra.redis.pid})")
    stack.env = dict(os.environ, WISP_NATS_URL=stack.nats_url, WISP_REDIS_URL=stack.redis_url,
                     **getattr(args, "extra_env", {}))
    for svc in plan_services(args):
        svc.log_path = stack.state_dir / "logs" / f"{svc.name}.log"
        _spawn(svc, stack.env)
        stack.services.append(svc)
    wait_ready(stack)
    wait_verifiers_known(stack)
    stack.write_stack_file()
    stack.ready = True


def _spawn(svc: ServiceProcess, env: dict) -> None:
    with open(svc.log_path, "ab") as log_file:  # the child keeps its own descriptor
        svc.proc = children.spawn(
            [sys.executable, "-m", svc.module, *svc.args, "--http-port", str(svc.http_port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    _say(f"started {svc.name} (pid {svc.proc.pid}, log {svc.log_path})")


def wait_ready(stack: Stack, timeout_s: float = READY_TIMEOUT_S,
               only: list[ServiceProcess] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(only or stack.services)
    while pending:
        for svc in list(pending):
            if svc.proc.poll() is not None:
                tail = svc.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode}; "
                                   f"last log lines:\n{tail}")
            if _http_ok(svc.url + "/readyz"):
                _say(f"{svc.name} ready at {svc.url}")
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"not ready after {timeout_s:.0f}s: {names} (see their logs)")
        time.sleep(0.25)


def wait_verifiers_known(stack: Stack, timeout_s: float = 30.0) -> None:
    """Ready means usable: the scheduler has heard every verifier's heartbeat, so the first
    session is not turned away for want of a verifier."""
    verifiers = {s.name.removeprefix("gpu-verifier-") for s in stack.services
                 if s.module == "services.gpu_verifier"}
    scheduler = next((s for s in stack.services if s.module == "services.admission_scheduler"),
                     None)
    if scheduler is None or not verifiers:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(scheduler.url + "/verifiers", timeout=1) as resp:
                known = {v["id"] for v in json.load(resp)["verifiers"] if v["alive"]}
            if {f"v{i}" for i in verifiers} <= known:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the admission-scheduler did not see every verifier within "
                       f"{timeout_s:.0f}s (see the logs in {stack.state_dir / 'logs'})")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_stack(stack: Stack, timeout_s: float = 20.0) -> None:
    """Stop every service, then the embedded servers, reaping each; then drop stack.json and
    the state directory's lock. Never raises on a signal (see `StopSignals`); a second one
    turns the remaining waits into SIGKILLs."""
    hurry = _never
    if stack.signals is not None:
        stack.signals.stopping()
        hurry = stack.signals.hurry
        if not hurry():
            _say("stopping the stack (Ctrl-C again to kill what is still running)")
    killed = []
    # Clients first (edges), then the scheduler, verifiers, predictor, metrics: each drains
    # in turn.
    for svc in reversed(stack.services):
        if svc.proc is None or svc.proc.poll() is not None:
            continue
        if children.stop(svc.proc, timeout_s, hurry):
            killed.append(svc.name)
            if not hurry():
                _say(f"{svc.name} did not stop in {timeout_s:.0f}s; killed it")
    if stack.infra is not None:
        stack.infra.stop(STOP_SERVERS_TIMEOUT_S, hurry)
    stack.stack_file.unlink(missing_ok=True)
    if stack.lock is not None:
        stack.lock.release()
    if hurry():
        _say("stack stopped fast: " + (f"killed {', '.join(killed)}; " if killed else "")
             + "no process left")
    else:
        _say("stack stopped")


def find_stack(state_dir: str) -> dict | None:
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def stack_nats_url(nats_url: str | None, state_dir: str, otherwise: str = "") -> str:
    """`nats_url` if given, else the NATS of the stack `wisp up` runs from `state_dir`; a
    RuntimeError saying how to get one when there is none (`otherwise`: the caller's other
    ways, e.g. "or use --local")."""
    if nats_url:
        return nats_url
    stack = find_stack(state_dir)
    if stack is None:
        raise RuntimeError(f"no running stack found in {state_dir}/stack.json: start one with "
                           f"`wisp up`, pass --nats-url{otherwise}")
    return stack["nats_url"]


def _say(text: str) -> None:
    print(f"[wisp up] {text}", file=sys.stderr, flush=True)
