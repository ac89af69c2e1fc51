"""The life of a service process: connect, serve, report health, drain on SIGTERM.

A service implements `Service`; `run_service` owns transport (NATS, Redis, HTTP) around it:
connect inside an AsyncExitStack, `start()` (subscribe), serve `/healthz` and `/readyz` (plus
the service's own routes), wait for SIGTERM/SIGINT, then `stop()` (stop taking new work, finish
in-flight work within `drain_timeout_s`) and drain NATS so published replies are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from abc import ABC, abstractmethod
from contextlib import AsyncExitStack

import nats
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS

from common.config import BaseConfig
from common.errors import WispError
from common.protocol import AnyEvent, RefusalEvent, encode
from common.subjects import event

log = structlog.get_logger(__name__)

NATS_CLOSE_TIMEOUT_S = 5.0


class Service(ABC):
    name: str = "service"

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.redis: aioredis.Redis | None = None

    @abstractmethod
    async def start(self) -> None:
        """Subscribe and start background tasks; self.nc and self.redis are connected."""

    async def stop(self) -> None:
        """Stop taking new work and finish what is in flight (bounded by the caller)."""

    def ready(self) -> bool:
        """True once the service can do useful work (models loaded, peers known...)."""
        return True

    def routes(self) -> list[web.RouteDef]:
        """Extra HTTP routes besides /healthz and /readyz (e.g. /metrics)."""
        return []


async def connect_nats(url: str, name: str) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    return await nats.connect(
        url, name=name, error_cb=on_error, disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        connect_timeout=5)


def connect_redis(url: str) -> aioredis.Redis:
    # Raw bytes: token lists and result blobs are not text.
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=10)


async def start_http(service: Service, host: str, port: int) -> tuple[web.AppRunner, int]:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": service.name})

    async def readyz(_: web.Request) -> web.Response:
        ok = service.ready()
        return web.json_response({"ready": ok, "service": service.name}, status=200 if ok else 503)

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), *service.routes()])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port=0
    return runner, bound


def prefer_loop_latency() -> None:
    """For a service process whose model runs on a worker thread (edge-drafter, verifier): the
    thread's Python between torch ops and the event loop share the GIL, and at CPython's default
    5 ms switch interval the loop can wait that long for each handoff, so replies and emulated
    device sleeps wake late (measured: 15 % of emulated-device rounds over their profile's
    time at 0.5 ms steps, 3.5 % with this). Called from the process's entry point only: it is
    process-wide."""
    sys.setswitchinterval(0.0005)


async def run_service(service: Service, config: BaseConfig,
                      stop_event: asyncio.Event | None = None) -> None:
    """Run `service` until SIGTERM/SIGINT (or `stop_event`), then shut down gracefully."""
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop_event.set)
    structlog.contextvars.bind_contextvars(service=service.name)
    async with AsyncExitStack() as stack:
        # Callbacks run last-in first-out: NATS is drained (handlers still running finish)
        # before Redis, which they may use, is closed.
        service.redis = connect_redis(config.redis_url)
        stack.push_async_callback(service.redis.aclose)
        service.nc = await connect_nats(config.nats_url, service.name)
        stack.push_async_callback(_close_nats, service.nc)
        await service.redis.ping()
        runner, port = await start_http(service, config.http_host, config.http_port)
        stack.push_async_callback(runner.cleanup)
        await service.start()
        log.info("service_started", http=f"http://{config.http_host}:{port}",
                 nats=config.nats_url)
        await stop_event.wait()
        log.info("service_stopping", drain_timeout_s=config.drain_timeout_s)
        try:
            await asyncio.wait_for(service.stop(), config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain_timeout", drain_timeout_s=config.drain_timeout_s)
    log.info("service_stopped")


async def publish_event(nc: NATS, ev: AnyEvent) -> None:
    """Publish `ev` on wisp.events.{kind}; an event lost to a closed connection is logged,
    never raised into the caller's work."""
    try:
        await nc.publish(event(type(ev).__struct_config__.tag), encode(ev))
    except Exception as exc:  # noqa: BLE001 - events are best effort
        log.warning("event_publish_failed", kind=type(ev).__struct_config__.tag, error=str(exc))


async def publish_refusal(nc: NATS, err: WispError, *, mode: str | None = None,
                          sid: str | None = None) -> None:
    """Tell the metrics service that a generation was refused with `err` before its first
    round (`mode` None: unknown, e.g. the request did not decode); best effort, as every event."""
    await publish_event(nc, RefusalEvent(ts_ms=time.time() * 1e3, code=str(err.code), mode=mode,
                                         sid=sid, retry_after_ms=err.retry_after_ms))


async def _close_nats(nc: NATS) -> None:
    # drain() flushes what we published (final replies) before closing. Bounded: with the
    # server gone, the client reconnects forever and drain() would never return (a service
    # whose `wisp up` was killed along with the servers must still exit).
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), NATS_CLOSE_TIMEOUT_S)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await nc.close()
