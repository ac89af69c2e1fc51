"""The metrics service: subscribe to ``wisp.events.>``, aggregate, serve HTTP.

Every message on ``wisp.events.>`` is decoded once, with ``decode(AnyEvent, data)``: the type
tag picks the event class and every field is checked there. A payload that does not decode is
counted as malformed (``undecodable``), logged (rate-limited) and dropped; it never stops the
subscription, and nothing else is counted.

Routes (besides /healthz and /readyz from ``common.transport.service``):

* ``GET /metrics`` — Prometheus text format of the aggregator's own registry;
* ``GET /summary`` — :meth:`MetricsAggregator.summary` as JSON;
* ``GET /`` — the live dashboard (:mod:`services.metrics.dashboard`): a static page whose
  script polls /summary every ``dashboard_refresh_s`` (no external assets).

Members of the ``METRICS_QUEUE`` group share the events, so each replica's /summary covers
its share; Prometheus sums the counters and histograms across replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.config import BaseConfig
from common.errors import WispError
from common.protocol import AnyEvent, decode
from common.subjects import EVENTS_ALL, METRICS_QUEUE
from common.transport.service import Service
from services.metrics.aggregate import (
    DEFAULT_LIVE_WINDOW_S,
    DEFAULT_MAX_SAMPLES,
    UNDECODABLE,
    MetricsAggregator,
    event_kind,
)
from services.metrics.dashboard import dashboard_page

__all__ = ["MetricsConfig", "MetricsService"]

log = structlog.get_logger(__name__)

_LOG_FIRST_BAD = 10  # then one line per _LOG_EVERY_BAD bad events
_LOG_EVERY_BAD = 1000


@dataclass(slots=True)
class MetricsConfig(BaseConfig):
    """The metrics service (python -m services.metrics)."""

    http_port: int = 9100
    max_samples: int = DEFAULT_MAX_SAMPLES  # per mode, for /summary percentiles
    live_window_s: float = DEFAULT_LIVE_WINDOW_S  # live throughput: requests this recent
    dashboard_refresh_s: float = 1.0  # the dashboard polls /summary this often

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if not self.live_window_s > 0:
            raise ValueError(f"live_window_s must be > 0, got {self.live_window_s}")
        if not self.dashboard_refresh_s > 0:
            raise ValueError(f"dashboard_refresh_s must be > 0, got {self.dashboard_refresh_s}")


class MetricsService(Service):
    name = "metrics"

    def __init__(self, config: MetricsConfig | None = None,
                 aggregator: MetricsAggregator | None = None):
        super().__init__()
        self.config = config or MetricsConfig()
        self.aggregator = aggregator or MetricsAggregator(
            max_samples=self.config.max_samples, live_window_s=self.config.live_window_s)
        self._page = dashboard_page(self.config.dashboard_refresh_s)
        self._sub: Subscription | None = None
        self._num_bad = 0

    async def start(self) -> None:
        assert self.nc is not None
        self._sub = await self.nc.subscribe(EVENTS_ALL, queue=METRICS_QUEUE, cb=self._on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    def ready(self) -> bool:
        return self._sub is not None

    async def _on_msg(self, msg: Msg) -> None:
        self.handle(msg.subject, msg.data)

    def handle(self, subject: str, data: bytes, now_s: float | None = None) -> None:
        """Decode and account one event payload received on ``subject``; never raises."""
        try:
            event = decode(AnyEvent, data)
        except WispError as exc:
            self.aggregator.count_malformed(UNDECODABLE)
            self._log_bad(subject, exc.message)
            return
        except Exception:  # a decoder bug: still not a reason to stop the subscription
            self.aggregator.count_malformed(UNDECODABLE)
            log.exception("event_decode_failed", subject=subject)
            return
        try:
            self.aggregator.observe(event, now_s)
        except Exception:  # a bug here must not stop the subscription
            self.aggregator.count_malformed(event_kind(event))
            log.exception("event_failed", subject=subject)

    def _log_bad(self, subject: str, reason: str) -> None:
        self._num_bad += 1
        if self._num_bad <= _LOG_FIRST_BAD or self._num_bad % _LOG_EVERY_BAD == 0:
            log.warning("bad_event", subject=subject, reason=reason, num_bad=self._num_bad)

    # -- HTTP -------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self._metrics), web.get("/summary", self._summary),
                web.get("/", self._dashboard)]

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.aggregator.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _summary(self, _: web.Request) -> web.Response:
        return web.json_response(self.aggregator.summary())

    async def _dashboard(self, _: web.Request) -> web.Response:
        return web.Response(text=self._page, content_type="text/html")
