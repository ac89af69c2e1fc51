"""Aggregation of ``wisp.events.*`` into the metrics of DESIGN.md §7 (no NATS, no HTTP).

:class:`MetricsAggregator` keeps Prometheus metrics in its own ``CollectorRegistry`` (counters
and histograms for scraping) and the raw samples that ``summary()`` needs for exact
percentiles and goodput. Event fields are those of docs/services.md "Events":

* ``request``: mode, num_tokens, ttft_ms, tpot_ms, e2e_ms, slo_ttft_ms, slo_tpot_ms, slo_met,
  rounds, drafted, accepted, finish_reason
* ``round``: mode, round, drafted, accepted, draft_ms, wasted_draft_ms, rtt_ms, budget_ms
* ``batch``: verifier_id, size, batch_ms, num_linear, num_interactions, num_cached, queue_depth
* ``error``: service, code

Definitions (DESIGN.md §7):

* a request **meets its SLO** when TTFT ≤ its TTFT SLO and TPOT ≤ its TPOT SLO — always
  recomputed here from the timings (the sender's ``slo_met`` is not trusted); a request whose
  SLO bounds are absent or 0 has no SLO; a request that failed (``finish_reason == "error"``)
  or produced no token misses it; TPOT of a one-token request is undefined and does not fail
  the SLO;
* SLO attainment = met / requests that carry an SLO (requests without one are reported apart);
* goodput = output tokens (and requests) per second of requests that met their SLO, over the
  mode's observed window: from the start of its earliest request (receipt − e2e) to the
  receipt of its latest, on this process's clock (edge and server clocks are not synchronised);
* acceptance length = accepted draft tokens per round; acceptance rate = accepted / drafted;
  WDT = Σ ``wasted_draft_ms`` of rounds.

Latency histograms and percentiles cover requests that did not fail. Percentiles use the last
``max_samples`` requests per mode (and batches), so memory stays bounded in a long run.
Unknown event kinds and unknown fields are ignored; an event whose known fields are missing or
ill-typed is counted as malformed and otherwise ignored.
"""

from __future__ import annotations

import math
import time
from collections import Counter as CounterMap
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.protocol import MODES, Event
from common.subjects import EVENT_BATCH, EVENT_REQUEST, EVENT_ROUND, is_name, is_safe_token

__all__ = [
    "EVENT_ERROR",
    "MalformedEvent",
    "MetricsAggregator",
    "percentile",
    "slo_outcome",
]

EVENT_ERROR = "error"
SLO_MET, SLO_MISSED, SLO_NONE = "met", "missed", "none"
PERCENTILES = (50, 90, 99)
DEFAULT_MAX_SAMPLES = 100_000
MAX_ERROR_SERIES = 1000  # distinct (service, code) pairs

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                  3.0, 5.0, 10.0, 20.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                  0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
                 120.0, 300.0)
ACCEPTANCE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
BATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class MalformedEvent(ValueError):
    """An event of a known kind whose fields are missing or ill-typed."""


# -- pure helpers -----------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ascending ``sorted_values``, interpolating linearly
    between closest ranks (numpy's default); None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def slo_outcome(f: dict[str, Any]) -> str:
    """"met", "missed" or "none" (no SLO) for the fields of a ``request`` event."""
    # An SLO bound is > 0 (protocol.Slo); 0 or absent means the request has none.
    slo_ttft = _number(f, "slo_ttft_ms") or None
    slo_tpot = _number(f, "slo_tpot_ms") or None
    if slo_ttft is None and slo_tpot is None:
        return SLO_NONE
    if f.get("finish_reason") == "error":
        return SLO_MISSED
    num_tokens = _count(f, "num_tokens", required=True)
    ttft, tpot = _number(f, "ttft_ms"), _number(f, "tpot_ms")
    met = True
    if slo_ttft is not None:
        met = met and num_tokens > 0 and ttft is not None and ttft <= slo_ttft
    if slo_tpot is not None:
        met = met and ((tpot is not None and tpot <= slo_tpot) if num_tokens >= 2
                       else num_tokens > 0)
    return SLO_MET if met else SLO_MISSED


def _number(f: dict[str, Any], name: str, *, required: bool = False) -> float | None:
    v = f.get(name)
    if v is None:
        if required:
            raise MalformedEvent(f"missing field {name!r}")
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise MalformedEvent(f"field {name!r} must be a finite number >= 0, got {v!r:.40}")
    return float(v)


def _count(f: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    v = f.get(name)
    if v is None:
        if required:
            raise MalformedEvent(f"missing field {name!r}")
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise MalformedEvent(f"field {name!r} must be an integer >= 0, got {v!r:.40}")
    return v


def _mode(f: dict[str, Any]) -> str:
    mode = f.get("mode")
    if mode not in MODES:
        raise MalformedEvent(f"field 'mode' must be one of {', '.join(MODES)}, got {mode!r:.40}")
    return mode  # type: ignore[return-value]


def _label(f: dict[str, Any], name: str, check: Callable[[object], bool],
           *, required: bool) -> str | None:
    v = f.get(name)
    if v is None and not required:
        return None
    if not check(v):  # labels become Prometheus series: only well-formed, bounded names
        raise MalformedEvent(f"field {name!r} is not a valid name: {v!r:.40}")
    return v  # type: ignore[return-value]


def _quantiles_ms(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {f"p{q}": _round(percentile(ordered, q)) for q in PERCENTILES}


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


# -- per-mode state for summary() -------------------------------------------------------------
@dataclass(slots=True)
class _ModeStats:
    max_samples: int
    requests: int = 0
    failed: int = 0
    slo: CounterMap = field(default_factory=CounterMap)  # met / missed / none
    output_tokens: int = 0
    met_tokens: int = 0
    window_start_s: float = math.inf
    window_end_s: float = -math.inf
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    wasted_draft_ms: float = 0.0
    ttft_ms: deque = field(init=False)
    tpot_ms: deque = field(init=False)
    e2e_ms: deque = field(init=False)

    def __post_init__(self) -> None:
        self.ttft_ms = deque(maxlen=self.max_samples)
        self.tpot_ms = deque(maxlen=self.max_samples)
        self.e2e_ms = deque(maxlen=self.max_samples)

    def summary(self) -> dict[str, Any]:
        with_slo = self.slo[SLO_MET] + self.slo[SLO_MISSED]
        window_s = self.window_end_s - self.window_start_s if self.requests else 0.0
        return {
            "requests": self.requests,
            "failed": self.failed,
            "requests_with_slo": with_slo,
            "requests_without_slo": self.slo[SLO_NONE],
            "slo_met": self.slo[SLO_MET],
            "slo_missed": self.slo[SLO_MISSED],
            "slo_attainment": _round(_ratio(self.slo[SLO_MET], with_slo), 4),
            "output_tokens": self.output_tokens,
            "window_s": _round(window_s),
            "throughput_tokens_per_s": _round(_ratio(self.output_tokens, window_s)),
            "goodput_tokens_per_s": _round(_ratio(self.met_tokens, window_s)),
            "goodput_requests_per_s": _round(_ratio(self.slo[SLO_MET], window_s), 4),
            "ttft_ms": _quantiles_ms(self.ttft_ms),
            "tpot_ms": _quantiles_ms(self.tpot_ms),
            "e2e_ms": _quantiles_ms(self.e2e_ms),
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_acceptance_length": _round(_ratio(self.accepted, self.rounds), 4),
            "acceptance_rate": _round(_ratio(self.accepted, self.drafted), 4),
            "wasted_draft_s": _round(self.wasted_draft_ms / 1000.0, 6),
        }


# -- the aggregator ---------------------------------------------------------------------------
class MetricsAggregator:
    """Feed it events with :meth:`observe`; scrape :attr:`registry`; read :meth:`summary`."""

    def __init__(self, *, max_samples: int = DEFAULT_MAX_SAMPLES,
                 clock: Callable[[], float] = time.monotonic):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._init_metrics()
        self._modes: dict[str, _ModeStats] = {}
        self._events: CounterMap = CounterMap()  # by kind ("other" for unknown kinds)
        self._malformed: CounterMap = CounterMap()  # by kind
        self._errors: CounterMap = CounterMap()  # (service, code)
        self._batch_count = 0
        self._batch_size_sum = 0
        self._batch_ms: deque[float] = deque(maxlen=max_samples)
        self._queue_depth: dict[str, int] = {}

    def _init_metrics(self) -> None:
        r = self.registry
        self.ttft = Histogram("wisp_ttft_seconds", "Time to first token", ["mode"],
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram("wisp_tpot_seconds", "Mean time per output token after the first",
                              ["mode"], buckets=TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("wisp_e2e_seconds", "End-to-end request latency", ["mode"],
                             buckets=E2E_BUCKETS_S, registry=r)
        self.requests = Counter("wisp_requests", "Finished requests by SLO outcome",
                                ["mode", "slo"], registry=r)
        self.output_tokens = Counter("wisp_output_tokens", "Output tokens of finished requests",
                                     ["mode"], registry=r)
        self.draft_tokens = Counter("wisp_draft_tokens", "Draft tokens sent for verification",
                                    ["mode"], registry=r)
        self.accepted_tokens = Counter("wisp_accepted_tokens", "Draft tokens accepted",
                                       ["mode"], registry=r)
        self.acceptance_length = Histogram("wisp_acceptance_length",
                                           "Accepted draft tokens per round", ["mode"],
                                           buckets=ACCEPTANCE_BUCKETS, registry=r)
        self.wasted_draft = Counter("wisp_wasted_draft_seconds",
                                    "Edge time spent drafting tokens that were rejected (WDT)",
                                    ["mode"], registry=r)
        self.batch_size = Histogram("wisp_batch_size", "Requests per verification batch",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("wisp_batch_seconds", "Verification batch time",
                                       buckets=BATCH_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("wisp_queue_depth", "Requests queued for a verifier",
                                 ["verifier_id"], registry=r)
        self.errors = Counter("wisp_errors", "Errors reported by services",
                              ["service", "code"], registry=r)
        self.events = Counter("wisp_metrics_events", "Events received by the metrics service",
                              ["kind"], registry=r)
        self.malformed = Counter("wisp_metrics_malformed_events",
                                 "Events that could not be used", ["kind"], registry=r)

    # -- input ------------------------------------------------------------------------------
    def observe(self, event: Event, now_s: float | None = None) -> bool:
        """Account one event received at ``now_s`` (this process's clock). False for an
        unknown kind (counted, ignored); an event with bad fields is counted as malformed and
        raises :class:`MalformedEvent` (nothing of it is applied)."""
        now_s = self._clock() if now_s is None else now_s
        handler = self._handlers.get(event.kind)
        kind = event.kind if handler is not None else "other"
        self._events[kind] += 1
        self.events.labels(kind).inc()
        if handler is None:
            return False
        try:
            handler(self, event.fields, now_s)
        except MalformedEvent:
            self.count_malformed(kind)
            raise
        return True

    def count_malformed(self, kind: str = "undecodable") -> None:
        """An event that could not be decoded at all, or whose fields were wrong."""
        self._malformed[kind] += 1
        self.malformed.labels(kind).inc()

    def _on_request(self, f: dict[str, Any], now_s: float) -> None:
        mode = _mode(f)
        num_tokens = _count(f, "num_tokens", required=True)
        e2e_ms = _number(f, "e2e_ms", required=True)
        ttft_ms, tpot_ms = _number(f, "ttft_ms"), _number(f, "tpot_ms")
        outcome = slo_outcome(f)
        failed = f.get("finish_reason") == "error"
        # All checks passed: from here on nothing raises, so the event counts fully or not at all.
        stats = self._mode_stats(mode)
        stats.requests += 1
        stats.failed += failed
        stats.slo[outcome] += 1
        stats.output_tokens += num_tokens
        if outcome == SLO_MET:
            stats.met_tokens += num_tokens
        stats.window_start_s = min(stats.window_start_s, now_s - e2e_ms / 1000.0)
        stats.window_end_s = max(stats.window_end_s, now_s)
        self.requests.labels(mode, outcome).inc()
        self.output_tokens.labels(mode).inc(num_tokens)
        if failed:
            return
        self.e2e.labels(mode).observe(e2e_ms / 1000.0)
        stats.e2e_ms.append(e2e_ms)
        if ttft_ms is not None and num_tokens > 0:
            self.ttft.labels(mode).observe(ttft_ms / 1000.0)
            stats.ttft_ms.append(ttft_ms)
        if tpot_ms is not None and num_tokens >= 2:
            self.tpot.labels(mode).observe(tpot_ms / 1000.0)
            stats.tpot_ms.append(tpot_ms)

    def _on_round(self, f: dict[str, Any], now_s: float) -> None:
        mode = _mode(f)
        drafted = _count(f, "drafted", required=True)
        accepted = _count(f, "accepted", required=True)
        if accepted > drafted:
            raise MalformedEvent(f"accepted ({accepted}) exceeds drafted ({drafted})")
        wasted_ms = _number(f, "wasted_draft_ms") or 0.0
        _count(f, "round")
        _number(f, "draft_ms")
        _number(f, "rtt_ms")
        stats = self._mode_stats(mode)
        stats.rounds += 1
        stats.drafted += drafted
        stats.accepted += accepted
        stats.wasted_draft_ms += wasted_ms
        self.draft_tokens.labels(mode).inc(drafted)
        self.accepted_tokens.labels(mode).inc(accepted)
        self.acceptance_length.labels(mode).observe(accepted)
        self.wasted_draft.labels(mode).inc(wasted_ms / 1000.0)

    def _on_batch(self, f: dict[str, Any], now_s: float) -> None:
        size = _count(f, "size", required=True)
        batch_ms = _number(f, "batch_ms", required=True)
        vid = _label(f, "verifier_id", is_safe_token, required=False)
        depth = _count(f, "queue_depth")
        self._batch_count += 1
        self._batch_size_sum += size
        self._batch_ms.append(batch_ms)
        self.batch_size.observe(size)
        self.batch_seconds.observe(batch_ms / 1000.0)
        if vid is not None and depth is not None:
            self._queue_depth[vid] = depth
            self.queue_depth.labels(vid).set(depth)

    def _on_error(self, f: dict[str, Any], now_s: float) -> None:
        service = _label(f, "service", is_name, required=True)
        code = _label(f, "code", is_name, required=True)
        if (service, code) not in self._errors and len(self._errors) >= MAX_ERROR_SERIES:
            code = "other"  # bound the number of series a noisy peer can create
        self._errors[(service, code)] += 1
        self.errors.labels(service, code).inc()

    _handlers: dict[str, Callable[[MetricsAggregator, dict[str, Any], float], None]] = {
        EVENT_REQUEST: _on_request,
        EVENT_ROUND: _on_round,
        EVENT_BATCH: _on_batch,
        EVENT_ERROR: _on_error,
    }

    def _mode_stats(self, mode: str) -> _ModeStats:
        stats = self._modes.get(mode)
        if stats is None:
            stats = self._modes[mode] = _ModeStats(self.max_samples)
        return stats

    # -- output -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A JSON-able report: per mode, batches, errors, event counts."""
        return {
            "modes": {mode: self._modes[mode].summary() for mode in sorted(self._modes)},
            "batches": {
                "count": self._batch_count,
                "mean_size": _round(_ratio(self._batch_size_sum, self._batch_count), 3),
                "batch_ms": _quantiles_ms(self._batch_ms),
                "queue_depth": dict(sorted(self._queue_depth.items())),
            },
            "errors": [{"service": s, "code": c, "count": n}
                       for (s, c), n in sorted(self._errors.items())],
            "events": {
                "received": dict(sorted(self._events.items())),
                "malformed": dict(sorted(self._malformed.items())),
            },
        }
