"""Aggregation of ``wisp.events.*`` into the metrics of docs/architecture.md (no NATS, no HTTP).

:class:`MetricsAggregator` keeps Prometheus metrics in its own ``CollectorRegistry`` (counters
and histograms for scraping) and the raw samples that ``summary()`` needs for exact
percentiles and goodput. Events are the typed structs of :mod:`common.protocol` (``AnyEvent``),
one handler per class:

* :class:`~common.protocol.RequestEvent` (``request``): a finished generation — mode,
  num_tokens, timings (TTFT, TPOT, E2E), slo (None: the request has none), stats (rounds,
  drafted, accepted over the whole request), finish_reason;
* :class:`~common.protocol.RoundEvent` (``round``): one round as the edge saw it — drafted,
  accepted, wasted_draft_ms, ...;
* :class:`~common.protocol.VerdictEvent` (``verdict``): one verified round as the verifier saw
  it — num_drafted, num_accepted, greedy, draft_features;
* :class:`~common.protocol.BatchEvent` (``batch``): one verification batch — verifier_id, size,
  batch_ms, queue_depth, ...;
* :class:`~common.protocol.ErrorEvent` (``error``): service, code;
* :class:`~common.protocol.ScheduleEvent` (``schedule``): one batch as the scheduler saw it —
  policy, the estimator's prediction next to the verifier's measured forward, the guard δ, the
  policy's decision time, deadlines met and missed, late dispatches;
* :class:`~common.protocol.AdmissionEvent` (``admission``): a session open as admission control
  decided it — outcome (admitted, queued, refused), predicted round time, budget, retry hint;
* :class:`~common.protocol.RefusalEvent` (``refusal``): a generation refused before its first
  round, as its client was told — code, mode (None: unknown), sid.

Their schema is checked once, where they are decoded (``decode(AnyEvent, data)``: types, ranges,
names, accepted ≤ drafted); an aggregator trusts what it is given. A payload that does not
decode (bad msgpack, an unknown type tag, a missing, unknown or ill-typed field) is never
observed: the service counts it with :meth:`MetricsAggregator.count_malformed`, and nothing
else changes.

Definitions (docs/architecture.md, "Metrics"):

* a request **meets its SLO** when TTFT ≤ its TTFT SLO and TPOT ≤ its TPOT SLO — always
  recomputed here from the timings; a request whose ``slo`` is None has no SLO; a request that
  failed (``finish_reason == "error"``) or produced no token misses it; TPOT of a one-token
  request is undefined and does not fail the SLO;
* SLO attainment = met / requests that carry an SLO (requests without one are reported apart);
* goodput = output tokens (and requests) per second of requests that met their SLO, over the
  mode's observed window: from the start of its earliest request (receipt − e2e) to the
  receipt of its latest, on this process's clock (edge and server clocks are not synchronised).
  It is unknown (None, with ``goodput_note`` saying why), not 0, while no request of the mode
  carried an SLO; requests without one are left out of it and counted in the note;
* live throughput = output tokens (and requests) of the requests received in the last
  ``live_window_s`` per second of that window (or of the mode's observed window, while it is
  shorter);
* acceptance length = accepted draft tokens per round; acceptance rate = accepted / drafted;
  WDT = Σ ``wasted_draft_ms`` of rounds. These come from round events (the edge's view); the
  per-request totals of request events (``stats``) are reported apart (``per_request``) so
  that a round is never counted twice, and verdict events (the verifier's view, no mode) are
  reported apart too (``verdicts``).

Scheduling, per batch policy (``schedule``): predicted and observed batch times side by side
(mean, p50, p99 over the last ``max_samples`` batches; predictions only of batches that had an
estimate, ``predicted_ms`` > 0), the estimator's error over the last ``ESTIMATOR_WINDOW``
batches with an estimate (MAPE = mean |observed − predicted| / observed; bias = mean
observed − predicted, > 0: batches run slower than predicted, the sign of the scheduler's own
error and guard), deadlines met and missed and the violation rate (missed / both), late
dispatches, and the policy's decision time. Admission (``admission``): decisions by outcome,
the refusal rate over final decisions (refused / (admitted + refused); a queued open is decided
again later), and the latest decision, overall and per verifier. Refusals (``refusal``): the
generations refused before their first round, by mode and error code — what clients were told
(common.transport.generation publishes them), whichever service decided it (the scheduler's ``error`` and ``admission`` events for the same open are counted apart, as
that service's own view). Verifier batch sizes per mode come from round events (the size of the
batch each round was verified in); the ``batches`` section is the verifiers' view of all modes.

Latency histograms and percentiles cover requests that did not fail. Percentiles use the last
``max_samples`` requests per mode (and batches), so memory stays bounded in a long run.
Errors are counted by (service, code) up to ``MAX_ERROR_SERIES`` distinct pairs; new pairs past
that share one series (``ERROR_OVERFLOW`` for both labels), so series stay bounded too; batch
policies likewise up to ``MAX_POLICY_SERIES`` names; refusal codes this build does not know
count as ``ERROR_OVERFLOW`` (modes are a closed set).
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

from common.errors import ErrorCode
from common.protocol import (
    AdmissionEvent,
    AnyEvent,
    BatchEvent,
    ErrorEvent,
    RefusalEvent,
    RequestEvent,
    RoundEvent,
    ScheduleEvent,
    VerdictEvent,
)
from common.stats import percentile

__all__ = [
    "DEFAULT_LIVE_WINDOW_S",
    "DEFAULT_MAX_SAMPLES",
    "ERROR_OVERFLOW",
    "ESTIMATOR_WINDOW",
    "MAX_ERROR_SERIES",
    "MAX_POLICY_SERIES",
    "NO_SLO_NOTE",
    "UNDECODABLE",
    "UNKNOWN_MODE",
    "MetricsAggregator",
    "event_kind",
    "percentile",
    "slo_outcome",
]

SLO_MET, SLO_MISSED, SLO_NONE = "met", "missed", "none"
UNDECODABLE = "undecodable"  # the kind under which payloads that fail to decode are counted
PERCENTILES = (50, 90, 99)
DEFAULT_MAX_SAMPLES = 100_000
DEFAULT_LIVE_WINDOW_S = 10.0  # live throughput: requests received this recently
UNKNOWN_MODE = "unknown"  # mode label of refusals whose mode is unknown
NO_SLO_NOTE = "no request carried an SLO"  # goodput_note when goodput is unknown
ERROR_CODES = frozenset(ErrorCode.__members__.values())
MAX_ERROR_SERIES = 1000  # distinct (service, code) pairs, besides the overflow series
ERROR_OVERFLOW = "other"  # service and code of the errors past MAX_ERROR_SERIES
MAX_POLICY_SERIES = 32  # distinct batch policy names; later ones count as ERROR_OVERFLOW
ESTIMATOR_WINDOW = 256  # batches over which the estimator's error is judged (its own window)
ADMISSION_OUTCOMES = ("admitted", "queued", "refused")

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
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                      0.05, 0.1)


# -- pure helpers -----------------------------------------------------------------------------
def event_kind(event: AnyEvent) -> str:
    """The event's type tag: the last token of its subject ``wisp.events.{kind}``."""
    return type(event).__struct_config__.tag


def slo_outcome(event: RequestEvent) -> str:
    """"met", "missed" or "none" (no SLO) for a finished request."""
    slo = event.slo
    if slo is None:
        return SLO_NONE
    n = event.num_tokens
    if event.finish_reason == "error" or n == 0:
        return SLO_MISSED
    ttft_ok = event.timings.ttft_ms <= slo.ttft_ms
    tpot_ok = n < 2 or event.timings.tpot_ms <= slo.tpot_ms  # undefined for one token
    return SLO_MET if ttft_ok and tpot_ok else SLO_MISSED


def _quantiles(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {f"p{q}": _round(percentile(ordered, q)) for q in PERCENTILES}


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _mean_quantiles_ms(values: Iterable[float]) -> dict[str, float | None]:
    """Mean, p50 and p99 (ms) of ``values``; None for each when empty."""
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered) if ordered else None
    return {"mean": _round(mean), "p50": _round(percentile(ordered, 50)),
            "p99": _round(percentile(ordered, 99))}


# -- per-mode state for summary() -------------------------------------------------------------
@dataclass(slots=True)
class _ModeStats:
    max_samples: int
    requests: int = 0
    failed: int = 0
    refused: int = 0  # refused before their first round (not in `requests`)
    slo: CounterMap = field(default_factory=CounterMap)  # met / missed / none
    output_tokens: int = 0
    met_tokens: int = 0
    window_start_s: float = math.inf
    window_end_s: float = -math.inf
    # From round events (the edge's view of each round).
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    wasted_draft_ms: float = 0.0
    wasted_tokens: int = 0  # drafted - accepted
    draft_ms: float = 0.0
    committed: int = 0
    # From request events' stats (each request's totals).
    request_rounds: int = 0
    request_drafted: int = 0
    request_accepted: int = 0
    ttft_ms: deque = field(init=False)
    tpot_ms: deque = field(init=False)
    e2e_ms: deque = field(init=False)
    batch_sizes: deque = field(init=False)  # of the batches its rounds were verified in
    recent: deque = field(init=False)  # (receipt s, output tokens) of the latest requests

    def __post_init__(self) -> None:
        self.ttft_ms = deque(maxlen=self.max_samples)
        self.tpot_ms = deque(maxlen=self.max_samples)
        self.e2e_ms = deque(maxlen=self.max_samples)
        self.batch_sizes = deque(maxlen=self.max_samples)
        self.recent = deque(maxlen=self.max_samples)

    def goodput_note(self, with_slo: int) -> str | None:
        """Why goodput is unknown, or which requests it leaves out; None: it covers all."""
        if self.requests == 0:
            return "no finished request yet"
        if with_slo == 0:
            return NO_SLO_NOTE
        without = self.slo[SLO_NONE]
        if without:
            return (f"{without} of {self.requests} requests carried no SLO and are not "
                    "counted in goodput or attainment")
        return None

    def live(self, now_s: float, window_s: float) -> dict[str, Any]:
        """Requests received in the last `window_s` (or since the mode's first request
        started, while that is shorter) per second; None before any request."""
        while self.recent and self.recent[0][0] <= now_s - window_s:
            self.recent.popleft()
        span = min(window_s, now_s - self.window_start_s) if self.requests else 0.0
        tokens = sum(n for _, n in self.recent)
        return {"window_s": _round(span),
                "requests_per_s": _round(_ratio(len(self.recent), span), 4),
                "tokens_per_s": _round(_ratio(tokens, span))}

    def summary(self, now_s: float, live_window_s: float) -> dict[str, Any]:
        with_slo = self.slo[SLO_MET] + self.slo[SLO_MISSED]
        window_s = self.window_end_s - self.window_start_s if self.requests else 0.0
        # Unknown, not 0, without a request that carried an SLO (0 would read as "all missed").
        slo_window_s = window_s if with_slo else 0.0
        sizes = sorted(self.batch_sizes)
        return {
            "requests": self.requests,
            "failed": self.failed,
            "refused": self.refused,
            "requests_with_slo": with_slo,
            "requests_without_slo": self.slo[SLO_NONE],
            "slo_met": self.slo[SLO_MET],
            "slo_missed": self.slo[SLO_MISSED],
            "slo_attainment": _round(_ratio(self.slo[SLO_MET], with_slo), 4),
            "output_tokens": self.output_tokens,
            "window_s": _round(window_s),
            "throughput_tokens_per_s": _round(_ratio(self.output_tokens, window_s)),
            "throughput_requests_per_s": _round(_ratio(self.requests, window_s), 4),
            "goodput_tokens_per_s": _round(_ratio(self.met_tokens, slo_window_s)),
            "goodput_requests_per_s": _round(_ratio(self.slo[SLO_MET], slo_window_s), 4),
            "goodput_note": self.goodput_note(with_slo),
            "live": self.live(now_s, live_window_s),
            "ttft_ms": _quantiles(self.ttft_ms),
            "tpot_ms": _quantiles(self.tpot_ms),
            "e2e_ms": _quantiles(self.e2e_ms),
            "batch_size": {"mean": _round(sum(sizes) / len(sizes), 3) if sizes else None,
                           **_quantiles(sizes)},
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_acceptance_length": _round(_ratio(self.accepted, self.rounds), 4),
            "acceptance_rate": _round(_ratio(self.accepted, self.drafted), 4),
            "wasted_draft_s": _round(self.wasted_draft_ms / 1000.0, 6),
            "wasted_tokens": self.wasted_tokens,
            "draft_s": _round(self.draft_ms / 1000.0, 6),
            "wasted_tokens_per_committed": _round(_ratio(self.wasted_tokens, self.committed), 4),
            "wasted_draft_ms_per_committed": _round(_ratio(self.wasted_draft_ms,
                                                           self.committed), 4),
            "per_request": {
                "rounds": self.request_rounds,
                "drafted": self.request_drafted,
                "accepted": self.request_accepted,
                "mean_rounds": _round(_ratio(self.request_rounds, self.requests), 4),
                "tokens_per_round": _round(_ratio(self.output_tokens, self.request_rounds), 4),
            },
        }


@dataclass(slots=True)
class _VerdictStats:
    """Verified rounds as the verifiers saw them (verdict events carry no mode)."""

    count: int = 0
    greedy: int = 0
    with_features: int = 0
    drafted: int = 0
    accepted: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "greedy": self.greedy,
            "with_features": self.with_features,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_acceptance_length": _round(_ratio(self.accepted, self.count), 4),
            "acceptance_rate": _round(_ratio(self.accepted, self.drafted), 4),
        }


@dataclass(slots=True)
class _ScheduleStats:
    """One batch policy's batches as the scheduler saw them."""

    max_samples: int
    batches: int = 0
    estimated: int = 0  # batches formed with an estimate (predicted_ms > 0)
    deadlines_met: int = 0
    deadlines_missed: int = 0
    late_dispatched: int = 0
    guard_ms: float = 0.0  # the latest batch's δ
    predicted_ms: deque = field(init=False)
    observed_ms: deque = field(init=False)
    decision_ms: deque = field(init=False)
    pairs: deque = field(init=False)  # (predicted, observed) of the latest estimated batches

    def __post_init__(self) -> None:
        self.predicted_ms = deque(maxlen=self.max_samples)
        self.observed_ms = deque(maxlen=self.max_samples)
        self.decision_ms = deque(maxlen=self.max_samples)
        self.pairs = deque(maxlen=min(self.max_samples, ESTIMATOR_WINDOW))

    def estimator(self) -> dict[str, Any]:
        """MAPE (a fraction) and bias (ms, observed − predicted) over the window; a batch
        measured at 0 ms has no relative error and only counts toward the bias."""
        pairs = list(self.pairs)
        relative = [abs(o - p) / o for p, o in pairs if o > 0]
        return {
            "window": len(pairs),
            "mape": _round(sum(relative) / len(relative), 4) if relative else None,
            "bias_ms": _round(sum(o - p for p, o in pairs) / len(pairs)) if pairs else None,
        }

    def summary(self) -> dict[str, Any]:
        judged = self.deadlines_met + self.deadlines_missed
        decision = sorted(self.decision_ms)
        return {
            "batches": self.batches,
            "estimated": self.estimated,
            "predicted_ms": _mean_quantiles_ms(self.predicted_ms),
            "observed_ms": _mean_quantiles_ms(self.observed_ms),
            "estimator": self.estimator(),
            "guard_ms": _round(self.guard_ms),
            "deadlines_met": self.deadlines_met,
            "deadlines_missed": self.deadlines_missed,
            "violation_rate": _round(_ratio(self.deadlines_missed, judged), 4),
            "late_dispatched": self.late_dispatched,
            "decision_ms": {"p50": _round(percentile(decision, 50), 4),
                            "p99": _round(percentile(decision, 99), 4)},
        }


@dataclass(slots=True)
class _AdmissionStats:
    """Session opens as admission control decided them."""

    outcomes: CounterMap = field(default_factory=CounterMap)
    last: dict[str, Any] | None = None
    by_verifier: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        final = self.outcomes["admitted"] + self.outcomes["refused"]
        return {
            **{outcome: self.outcomes[outcome] for outcome in ADMISSION_OUTCOMES},
            "refusal_rate": _round(_ratio(self.outcomes["refused"], final), 4),
            "last": self.last,
            "by_verifier": dict(sorted(self.by_verifier.items())),
        }


# -- the aggregator ---------------------------------------------------------------------------
class MetricsAggregator:
    """Feed it decoded events with :meth:`observe`; scrape :attr:`registry`; read
    :meth:`summary`."""

    def __init__(self, *, max_samples: int = DEFAULT_MAX_SAMPLES,
                 live_window_s: float = DEFAULT_LIVE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if not live_window_s > 0:
            raise ValueError(f"live_window_s must be > 0, got {live_window_s}")
        self.max_samples = max_samples
        self.live_window_s = live_window_s
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self._init_metrics()
        self._modes: dict[str, _ModeStats] = {}
        self._events: CounterMap = CounterMap()  # by kind (type tag)
        self._malformed: CounterMap = CounterMap()  # by kind
        self._errors: CounterMap = CounterMap()  # (service, code)
        self._verdicts = _VerdictStats()
        self._batch_count = 0
        self._batch_size_sum = 0
        self._batch_ms: deque[float] = deque(maxlen=max_samples)
        self._queue_depth: dict[str, int] = {}
        self._schedule: dict[str, _ScheduleStats] = {}  # by policy
        self._admission = _AdmissionStats()
        self._refusals: CounterMap = CounterMap()  # (mode or UNKNOWN_MODE, code)

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
        # A mode's series appears with its first request that carried an SLO: without one
        # goodput is unknown, and an absent series says so where a 0 would say "all missed".
        self.goodput_tokens = Counter("wisp_goodput_tokens",
                                      "Output tokens of requests that met their SLO", ["mode"],
                                      registry=r)
        self.refusals = Counter("wisp_refusals",
                                "Generations refused before their first round, by error code",
                                ["mode", "code"], registry=r)
        self.request_rounds = Counter("wisp_request_rounds",
                                      "Rounds of finished requests (their own totals)",
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
        self.wasted_tokens = Counter("wisp_wasted_draft_tokens",
                                     "Drafted tokens the target rejected", ["mode"],
                                     registry=r)
        self.verdict_draft_tokens = Counter("wisp_verdict_draft_tokens",
                                            "Draft tokens verified (the verifiers' view)",
                                            registry=r)
        self.verdict_accepted_tokens = Counter("wisp_verdict_accepted_tokens",
                                               "Draft tokens accepted (the verifiers' view)",
                                               registry=r)
        self.batch_size = Histogram("wisp_batch_size", "Requests per verification batch",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("wisp_batch_seconds", "Verification batch time",
                                       buckets=BATCH_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("wisp_queue_depth", "Requests queued for a verifier",
                                 ["verifier_id"], registry=r)
        self.errors = Counter("wisp_errors", "Errors reported by services",
                              ["service", "code"], registry=r)
        self.schedule_predicted = Histogram(
            "wisp_schedule_predicted_seconds", "Estimated batch time when the batch was formed",
            ["policy"], buckets=BATCH_BUCKETS_S, registry=r)
        self.schedule_observed = Histogram(
            "wisp_schedule_observed_seconds", "Measured batch time (the verifier's forward)",
            ["policy"], buckets=BATCH_BUCKETS_S, registry=r)
        self.schedule_decision = Histogram(
            "wisp_schedule_decision_seconds", "Time the batch policy took to pick a batch",
            ["policy"], buckets=DECISION_BUCKETS_S, registry=r)
        self.deadlines = Counter("wisp_schedule_deadlines",
                                 "Verify requests by deadline outcome", ["policy", "outcome"],
                                 registry=r)
        self.late_dispatched = Counter("wisp_schedule_late_dispatched",
                                       "Requests dispatched past their latest start time",
                                       ["policy"], registry=r)
        self.estimator_mape = Gauge("wisp_estimator_mape",
                                    "Estimator's mean absolute percentage error (a fraction) "
                                    "over its recent batches", ["policy"], registry=r)
        self.estimator_bias = Gauge("wisp_estimator_bias_seconds",
                                    "Estimator's mean error (observed - predicted) over its "
                                    "recent batches", ["policy"], registry=r)
        self.estimator_guard = Gauge("wisp_estimator_guard_seconds",
                                     "Guard (delta) in force for the latest batch",
                                     ["verifier_id"], registry=r)
        self.admissions = Counter("wisp_admissions", "Session opens by admission outcome",
                                  ["outcome"], registry=r)
        self.admission_predicted = Gauge(
            "wisp_admission_predicted_round_seconds",
            "Predicted server time per round of the latest admission decision",
            ["verifier_id"], registry=r)
        self.admission_budget = Gauge(
            "wisp_admission_budget_seconds",
            "Tightest per-round server budget of the latest admission decision (0: no SLO)",
            ["verifier_id"], registry=r)
        self.events = Counter("wisp_metrics_events", "Events received by the metrics service",
                              ["kind"], registry=r)
        self.malformed = Counter("wisp_metrics_malformed_events",
                                 "Events that could not be used", ["kind"], registry=r)

    # -- input ------------------------------------------------------------------------------
    def observe(self, event: AnyEvent, now_s: float | None = None) -> None:
        """Account one decoded event received at ``now_s`` (this process's clock).

        ``event`` has passed ``decode(AnyEvent, ...)`` (or was built in Python by trusted
        code); anything that is not an event is a bug and raises ``TypeError``."""
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"not an event: {type(event).__name__}")
        kind = event_kind(event)
        self._events[kind] += 1
        self.events.labels(kind).inc()
        handler(self, event, self._clock() if now_s is None else now_s)

    def count_malformed(self, kind: str = UNDECODABLE) -> None:
        """A payload that could not be decoded (or, with its kind, an event that broke the
        aggregator); nothing else is counted."""
        self._malformed[kind] += 1
        self.malformed.labels(kind).inc()

    def _on_request(self, ev: RequestEvent, now_s: float) -> None:
        mode, n, t = ev.mode, ev.num_tokens, ev.timings
        outcome = slo_outcome(ev)
        failed = ev.finish_reason == "error"
        stats = self._mode_stats(mode)
        stats.requests += 1
        stats.failed += failed
        stats.slo[outcome] += 1
        stats.output_tokens += n
        if outcome == SLO_MET:
            stats.met_tokens += n
        stats.window_start_s = min(stats.window_start_s, now_s - t.e2e_ms / 1000.0)
        stats.window_end_s = max(stats.window_end_s, now_s)
        stats.request_rounds += ev.stats.rounds
        stats.request_drafted += ev.stats.drafted
        stats.request_accepted += ev.stats.accepted
        self.requests.labels(mode, outcome).inc()
        self.output_tokens.labels(mode).inc(n)
        self.request_rounds.labels(mode).inc(ev.stats.rounds)
        if outcome != SLO_NONE:
            self.goodput_tokens.labels(mode).inc(n if outcome == SLO_MET else 0)
        stats.recent.append((now_s, n))
        if failed:
            return
        self.e2e.labels(mode).observe(t.e2e_ms / 1000.0)
        stats.e2e_ms.append(t.e2e_ms)
        if n > 0:  # TTFT of a request without a token is undefined
            self.ttft.labels(mode).observe(t.ttft_ms / 1000.0)
            stats.ttft_ms.append(t.ttft_ms)
        if n >= 2:  # TPOT of a one-token request is undefined
            self.tpot.labels(mode).observe(t.tpot_ms / 1000.0)
            stats.tpot_ms.append(t.tpot_ms)

    def _on_round(self, ev: RoundEvent, now_s: float) -> None:
        mode = ev.mode
        stats = self._mode_stats(mode)
        stats.rounds += 1
        stats.drafted += ev.drafted
        stats.accepted += ev.accepted
        stats.wasted_draft_ms += ev.wasted_draft_ms
        wasted = ev.drafted - ev.accepted
        stats.wasted_tokens += wasted
        stats.draft_ms += ev.draft_ms
        stats.committed += ev.committed
        stats.batch_sizes.append(ev.batch_size)
        self.wasted_tokens.labels(mode).inc(wasted)
        self.draft_tokens.labels(mode).inc(ev.drafted)
        self.accepted_tokens.labels(mode).inc(ev.accepted)
        self.acceptance_length.labels(mode).observe(ev.accepted)
        self.wasted_draft.labels(mode).inc(ev.wasted_draft_ms / 1000.0)

    def _on_verdict(self, ev: VerdictEvent, now_s: float) -> None:
        v = self._verdicts
        v.count += 1
        v.greedy += ev.greedy
        v.with_features += ev.draft_features is not None
        v.drafted += ev.num_drafted
        v.accepted += ev.num_accepted
        self.verdict_draft_tokens.inc(ev.num_drafted)
        self.verdict_accepted_tokens.inc(ev.num_accepted)

    def _on_batch(self, ev: BatchEvent, now_s: float) -> None:
        self._batch_count += 1
        self._batch_size_sum += ev.size
        self._batch_ms.append(ev.batch_ms)
        self.batch_size.observe(ev.size)
        self.batch_seconds.observe(ev.batch_ms / 1000.0)
        self._queue_depth[ev.verifier_id] = ev.queue_depth
        self.queue_depth.labels(ev.verifier_id).set(ev.queue_depth)

    def _on_error(self, ev: ErrorEvent, now_s: float) -> None:
        service, code = ev.service, ev.code
        if (service, code) not in self._errors and len(self._errors) >= MAX_ERROR_SERIES:
            # Bound the series a noisy peer can create: past the cap, every new pair shares
            # one series (both labels, as service names are as open-ended as codes).
            service = code = ERROR_OVERFLOW
        self._errors[(service, code)] += 1
        self.errors.labels(service, code).inc()

    def _on_schedule(self, ev: ScheduleEvent, now_s: float) -> None:
        policy = ev.policy
        if policy not in self._schedule and len(self._schedule) >= MAX_POLICY_SERIES:
            policy = ERROR_OVERFLOW  # bound the series a peer's policy names can create
        stats = self._schedule.get(policy)
        if stats is None:
            stats = self._schedule[policy] = _ScheduleStats(self.max_samples)
        stats.batches += 1
        stats.observed_ms.append(ev.observed_ms)
        stats.decision_ms.append(ev.decision_ms)
        stats.deadlines_met += ev.deadlines_met
        stats.deadlines_missed += ev.deadlines_missed
        stats.late_dispatched += ev.late_dispatched
        stats.guard_ms = ev.guard_ms
        self.schedule_observed.labels(policy).observe(ev.observed_ms / 1000.0)
        self.schedule_decision.labels(policy).observe(ev.decision_ms / 1000.0)
        self.deadlines.labels(policy, "met").inc(ev.deadlines_met)
        self.deadlines.labels(policy, "missed").inc(ev.deadlines_missed)
        self.late_dispatched.labels(policy).inc(ev.late_dispatched)
        self.estimator_guard.labels(ev.verifier_id).set(ev.guard_ms / 1000.0)
        if ev.predicted_ms <= 0:
            return  # no estimate yet: nothing to compare
        stats.estimated += 1
        stats.predicted_ms.append(ev.predicted_ms)
        stats.pairs.append((ev.predicted_ms, ev.observed_ms))
        self.schedule_predicted.labels(policy).observe(ev.predicted_ms / 1000.0)
        error = stats.estimator()
        if error["mape"] is not None:
            self.estimator_mape.labels(policy).set(error["mape"])
        self.estimator_bias.labels(policy).set(error["bias_ms"] / 1000.0)

    def _on_admission(self, ev: AdmissionEvent, now_s: float) -> None:
        a = self._admission
        a.outcomes[ev.outcome] += 1
        self.admissions.labels(ev.outcome).inc()
        decision = {"predicted_round_ms": ev.predicted_round_ms, "budget_ms": ev.budget_ms,
                    "retry_after_ms": ev.retry_after_ms}
        a.last = {"sid": ev.sid, "outcome": ev.outcome, "verifier_id": ev.verifier_id,
                  **decision}
        if ev.verifier_id is not None:
            a.by_verifier[ev.verifier_id] = {"outcome": ev.outcome, **decision}
            self.admission_predicted.labels(ev.verifier_id).set(ev.predicted_round_ms / 1000.0)
            self.admission_budget.labels(ev.verifier_id).set(ev.budget_ms / 1000.0)

    def _on_refusal(self, ev: RefusalEvent, now_s: float) -> None:
        # Codes come from peers: one this build does not know shares the overflow series.
        code = ev.code if ev.code in ERROR_CODES else ERROR_OVERFLOW
        mode = ev.mode or UNKNOWN_MODE
        if ev.mode is not None:
            self._mode_stats(ev.mode).refused += 1
        self._refusals[(mode, code)] += 1
        self.refusals.labels(mode, code).inc()

    _handlers: dict[type, Callable[[MetricsAggregator, Any, float], None]] = {
        RequestEvent: _on_request,
        RoundEvent: _on_round,
        VerdictEvent: _on_verdict,
        BatchEvent: _on_batch,
        ErrorEvent: _on_error,
        ScheduleEvent: _on_schedule,
        AdmissionEvent: _on_admission,
        RefusalEvent: _on_refusal,
    }

    def _mode_stats(self, mode: str) -> _ModeStats:
        stats = self._modes.get(mode)
        if stats is None:
            stats = self._modes[mode] = _ModeStats(self.max_samples)
        return stats

    # -- output -----------------------------------------------------------------------------
    def _refusal_summary(self) -> dict[str, Any]:
        by_code: CounterMap = CounterMap()
        by_mode: CounterMap = CounterMap()
        for (mode, code), n in self._refusals.items():
            by_code[code] += n
            by_mode[mode] += n
        return {
            "total": sum(self._refusals.values()),
            "by_code": dict(sorted(by_code.items())),
            "by_mode": dict(sorted(by_mode.items())),
            "counts": [{"mode": m, "code": c, "count": n}
                       for (m, c), n in sorted(self._refusals.items())],
        }

    def summary(self, now_s: float | None = None) -> dict[str, Any]:
        """A JSON-able report at ``now_s`` (this process's clock; live rates need it): per
        mode, refusals, verdicts, batches, scheduling per policy, admission, errors, event
        counts."""
        now_s = self._clock() if now_s is None else now_s
        return {
            "live_window_s": self.live_window_s,
            "modes": {mode: self._modes[mode].summary(now_s, self.live_window_s)
                      for mode in sorted(self._modes)},
            "refusals": self._refusal_summary(),
            "verdicts": self._verdicts.summary(),
            "batches": {
                "count": self._batch_count,
                "mean_size": _round(_ratio(self._batch_size_sum, self._batch_count), 3),
                "batch_ms": _quantiles(self._batch_ms),
                "queue_depth": dict(sorted(self._queue_depth.items())),
            },
            "schedule": {policy: self._schedule[policy].summary()
                         for policy in sorted(self._schedule)},
            "admission": self._admission.summary(),
            "errors": [{"service": s, "code": c, "count": n}
                       for (s, c), n in sorted(self._errors.items())],
            "events": {
                "received": dict(sorted(self._events.items())),
                "malformed": dict(sorted(self._malformed.items())),
            },
        }
