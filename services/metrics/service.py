"""The metrics service: subscribe to ``wisp.events.>``, aggregate, serve HTTP.

Every message on ``wisp.events.>`` is decoded once, with ``decode(AnyEvent, data)``: the type
tag picks the event class and every field is checked there. A payload that does not decode is
counted as malformed (``undecodable``), logged (rate-limited) and dropped; it never stops the
subscription, and nothing else is counted.

Routes (besides /healthz and /readyz from ``common.transport.service``):

* ``GET /metrics`` — Prometheus text format of the aggregator's own registry;
* ``GET /summary`` — :meth:`MetricsAggregator.summary` as JSON;
* ``GET /`` — a small self-refreshing HTML dashboard of the summary (no external assets).

Members of the ``METRICS_QUEUE`` group share the events, so each replica's /summary covers
its share; Prometheus sums the counters and histograms across replicas.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

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
    DEFAULT_MAX_SAMPLES,
    UNDECODABLE,
    MetricsAggregator,
    event_kind,
)

__all__ = ["MetricsConfig", "MetricsService", "render_dashboard"]

log = structlog.get_logger(__name__)

_LOG_FIRST_BAD = 10  # then one line per _LOG_EVERY_BAD bad events
_LOG_EVERY_BAD = 1000


@dataclass(slots=True)
class MetricsConfig(BaseConfig):
    """The metrics service (python -m services.metrics)."""

    http_port: int = 9100
    max_samples: int = DEFAULT_MAX_SAMPLES  # per mode, for /summary percentiles
    dashboard_refresh_s: int = 5

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.dashboard_refresh_s < 1:
            raise ValueError(f"dashboard_refresh_s must be >= 1, got {self.dashboard_refresh_s}")


class MetricsService(Service):
    name = "metrics"

    def __init__(self, config: MetricsConfig | None = None,
                 aggregator: MetricsAggregator | None = None):
        super().__init__()
        self.config = config or MetricsConfig()
        self.aggregator = aggregator or MetricsAggregator(max_samples=self.config.max_samples)
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
        page = render_dashboard(self.aggregator.summary(), self.config.dashboard_refresh_s)
        return web.Response(text=page, content_type="text/html")


# -- dashboard --------------------------------------------------------------------------------
_MODE_COLUMNS = (
    ("requests", "requests"),
    ("failed", "failed"),
    ("SLO attainment", "slo_attainment"),
    ("no SLO", "requests_without_slo"),
    ("goodput tok/s", "goodput_tokens_per_s"),
    ("goodput req/s", "goodput_requests_per_s"),
    ("throughput tok/s", "throughput_tokens_per_s"),
    ("TTFT p50/p90/p99 ms", "ttft_ms"),
    ("TPOT p50/p90/p99 ms", "tpot_ms"),
    ("E2E p50/p90/p99 ms", "e2e_ms"),
    ("accept len", "mean_acceptance_length"),
    ("accept rate", "acceptance_rate"),
    ("WDT s", "wasted_draft_s"),
)

_VERDICT_COLUMNS = (
    ("rounds", "count"),
    ("greedy", "greedy"),
    ("with features", "with_features"),
    ("accept len", "mean_acceptance_length"),
    ("accept rate", "acceptance_rate"),
)

_SCHEDULE_COLUMNS = (
    ("batches", "batches"),
    ("predicted mean/p50/p99 ms", "predicted_ms"),
    ("observed mean/p50/p99 ms", "observed_ms"),
    ("estimator window/MAPE/bias ms", "estimator"),
    ("guard ms", "guard_ms"),
    ("deadlines met", "deadlines_met"),
    ("missed", "deadlines_missed"),
    ("violation rate", "violation_rate"),
    ("late dispatched", "late_dispatched"),
    ("decision p50/p99 ms", "decision_ms"),
)

_ADMISSION_COLUMNS = (
    ("admitted", "admitted"),
    ("queued", "queued"),
    ("refused", "refused"),
    ("refusal rate", "refusal_rate"),
)

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.muted { color: #888; }
"""


def _cell(v: Any) -> str:
    if v is None:
        return '<span class="muted">–</span>'
    if isinstance(v, dict):
        return " / ".join(_cell(x) for x in v.values())
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_dashboard(summary: dict[str, Any], refresh_s: int = 5) -> str:
    modes = summary.get("modes", {})
    mode_rows = [[mode] + [stats.get(key) for _, key in _MODE_COLUMNS]
                 for mode, stats in modes.items()]
    verdicts = summary.get("verdicts", {})
    verdict_rows = [[verdicts.get(key) for _, key in _VERDICT_COLUMNS]] if verdicts else []
    batches = summary.get("batches", {})
    batch_row = [[batches.get("count"), batches.get("mean_size"), batches.get("batch_ms")]]
    depth_rows = [[vid, depth] for vid, depth in batches.get("queue_depth", {}).items()]
    schedule_rows = [[policy] + [stats.get(key) for _, key in _SCHEDULE_COLUMNS]
                     for policy, stats in summary.get("schedule", {}).items()]
    admission = summary.get("admission", {})
    admission_row = [[admission.get(key) for _, key in _ADMISSION_COLUMNS]] if admission else []
    decision_rows = [[vid, d.get("outcome"), d.get("predicted_round_ms"), d.get("budget_ms"),
                      d.get("retry_after_ms")]
                     for vid, d in admission.get("by_verifier", {}).items()]
    error_rows = [[e["service"], e["code"], e["count"]] for e in summary.get("errors", [])]
    events = summary.get("events", {})
    event_rows = [[kind, n, events.get("malformed", {}).get(kind, 0)]
                  for kind, n in events.get("received", {}).items()]
    if "undecodable" in events.get("malformed", {}):
        event_rows.append(["undecodable", None, events["malformed"]["undecodable"]])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{int(refresh_s)}">
<title>wisp metrics</title><style>{_STYLE}</style></head><body>
<h1>wisp</h1>
<p class="muted">refreshes every {int(refresh_s)} s ·
<a href="/summary">/summary</a> · <a href="/metrics">/metrics</a></p>
<h2>Requests by mode</h2>
{_table(["mode"] + [h for h, _ in _MODE_COLUMNS], mode_rows, "no requests yet")}
<h2>Verified rounds (verifiers' view)</h2>
{_table([h for h, _ in _VERDICT_COLUMNS], verdict_rows, "no verdicts yet")}
<h2>Verification batches</h2>
{_table(["batches", "mean size", "batch p50/p90/p99 ms"], batch_row, "")}
{_table(["verifier", "queue depth"], depth_rows, "no queue depth reported")}
<h2>Scheduling by batch policy</h2>
{_table(["policy"] + [h for h, _ in _SCHEDULE_COLUMNS], schedule_rows, "no scheduled batches yet")}
<h2>Admission</h2>
{_table([h for h, _ in _ADMISSION_COLUMNS], admission_row, "")}
{_table(["verifier", "latest decision", "predicted round ms", "budget ms", "retry after ms"],
        decision_rows, "no admission decisions yet")}
<h2>Errors</h2>
{_table(["service", "code", "count"], error_rows, "no errors")}
<h2>Events</h2>
{_table(["kind", "received", "malformed"], event_rows, "no events yet")}
</body></html>
"""
