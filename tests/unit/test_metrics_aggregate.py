"""The metrics aggregator's math on hand-made typed events, and the service's decode step
(no NATS, no HTTP)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest

from common.errors import ErrorCode, WispError
from common.protocol import (
    AdmissionEvent,
    AnyEvent,
    BatchEvent,
    ErrorEvent,
    GenerateStats,
    GenerateTimings,
    RefusalEvent,
    RequestEvent,
    RoundEvent,
    ScheduleEvent,
    Slo,
    VerdictEvent,
    decode,
    encode,
)
from services.metrics.aggregate import (
    ERROR_OVERFLOW,
    ESTIMATOR_WINDOW,
    MAX_ERROR_SERIES,
    MAX_POLICY_SERIES,
    NO_SLO_NOTE,
    UNKNOWN_MODE,
    MetricsAggregator,
    event_kind,
    percentile,
    slo_outcome,
)
from services.metrics.dashboard import dashboard_page
from services.metrics.service import MetricsConfig, MetricsService

SID = "s" * 8
FEATURES = [[0.9, 0.3, 0.5, 0.1, 0.0, 0.9, 1.0]]  # one drafted token's DRAFT_FEATURES row


# -- event factories ----------------------------------------------------------------------------
def request(mode: str = "wisp", *, num_tokens: int = 10, ttft_ms: float = 100.0,
            tpot_ms: float = 20.0, e2e_ms: float = 280.0,
            slo: tuple[float, float] | None = (200.0, 30.0), finish_reason: str = "length",
            stats: GenerateStats | None = None) -> RequestEvent:
    return RequestEvent(
        ts_ms=1.0, sid=SID, mode=mode, num_tokens=num_tokens,
        timings=GenerateTimings(ttft_ms=ttft_ms, tpot_ms=tpot_ms, e2e_ms=e2e_ms),
        slo=None if slo is None else Slo(ttft_ms=slo[0], tpot_ms=slo[1]),
        stats=stats or GenerateStats(rounds=3, drafted=12, accepted=9),
        finish_reason=finish_reason)


def round_event(mode: str = "wisp", *, drafted: int = 4, accepted: int = 2,
                wasted_draft_ms: float = 0.0, round: int = 0, batch_size: int = 2) -> RoundEvent:
    return RoundEvent(ts_ms=1.0, sid=SID, mode=mode, round=round, drafted=drafted,
                      accepted=accepted, committed=accepted + 1, draft_ms=40.0,
                      wasted_draft_ms=wasted_draft_ms, rtt_ms=10.0, budget_ms=-5.0,
                      batch_size=batch_size)


def verdict(*, num_drafted: int = 1, num_accepted: int = 1, greedy: bool = True,
            draft_features: list[list[float]] | None = None) -> VerdictEvent:
    return VerdictEvent(ts_ms=1.0, sid=SID, round=0, device_id="jetson-orin", greedy=greedy,
                        num_drafted=num_drafted, num_accepted=num_accepted,
                        draft_features=draft_features)


def batch(verifier_id: str = "v1", *, size: int = 2, batch_ms: float = 10.0,
          queue_depth: int = 0) -> BatchEvent:
    return BatchEvent(ts_ms=1.0, verifier_id=verifier_id, batch_id="b1", size=size,
                      batch_ms=batch_ms, num_linear=size, num_interactions=size * 10,
                      num_cached=100, queue_depth=queue_depth)


def error(service: str = "gpu-verifier", code: str = "internal") -> ErrorEvent:
    return ErrorEvent(ts_ms=1.0, service=service, code=code, sid=SID)


def schedule(policy: str = "wisp", *, predicted_ms: float = 10.0, observed_ms: float = 12.0,
             met: int = 2, missed: int = 0, late: int = 0, decision_ms: float = 0.05,
             guard_ms: float = 1.5, verifier_id: str = "v1") -> ScheduleEvent:
    return ScheduleEvent(ts_ms=1.0, verifier_id=verifier_id, batch_id="b1", policy=policy,
                         size=met + missed, predicted_ms=predicted_ms, observed_ms=observed_ms,
                         guard_ms=guard_ms, decision_ms=decision_ms, deadlines_met=met,
                         deadlines_missed=missed, late_dispatched=late)


def admission(outcome: str = "admitted", *, verifier_id: str | None = "v1",
              predicted_round_ms: float = 40.0, budget_ms: float = 60.0,
              retry_after_ms: float = 0.0) -> AdmissionEvent:
    return AdmissionEvent(ts_ms=1.0, sid=SID, outcome=outcome, verifier_id=verifier_id,
                          predicted_round_ms=predicted_round_ms, budget_ms=budget_ms,
                          retry_after_ms=retry_after_ms)


def refusal(code: str = "prompt_too_long", mode: str | None = "wisp") -> RefusalEvent:
    return RefusalEvent(ts_ms=1.0, code=code, mode=mode, sid=SID)


def sample(agg: MetricsAggregator, name: str, labels: dict[str, str]) -> float | None:
    return agg.registry.get_sample_value(name, labels)


def all_samples(agg: MetricsAggregator) -> dict[tuple[str, tuple], float]:
    """Every sample of the registry but the series-creation timestamps."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in agg.registry.collect() for s in family.samples
            if not s.name.endswith("_created")}


def test_factories_build_events_that_survive_the_wire() -> None:
    events = [request(), request(slo=None, num_tokens=0, finish_reason="error"), round_event(),
              verdict(draft_features=FEATURES), verdict(greedy=False), batch(), error(),
              schedule(), admission("refused", verifier_id=None, retry_after_ms=900.0)]
    for ev in events:
        assert decode(AnyEvent, encode(ev)) == ev
    assert (event_kind(schedule()), event_kind(admission())) == ("schedule", "admission")
    assert [event_kind(ev) for ev in events[:3]] == ["request", "request", "round"]
    assert event_kind(batch()) == "batch"
    assert (event_kind(verdict()), event_kind(error())) == ("verdict", "error")


# -- SLO ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ev", "expected"), [
    (request(num_tokens=5, ttft_ms=100, tpot_ms=20, slo=(200, 30)), "met"),
    (request(num_tokens=5, ttft_ms=200, tpot_ms=30, slo=(200, 30)), "met"),  # bounds included
    (request(num_tokens=5, ttft_ms=201, tpot_ms=20, slo=(200, 30)), "missed"),
    (request(num_tokens=5, ttft_ms=100, tpot_ms=31, slo=(200, 30)), "missed"),
    (request(num_tokens=5, ttft_ms=100, tpot_ms=20, slo=None), "none"),
    (request(num_tokens=5, ttft_ms=9e3, tpot_ms=9e3, slo=None), "none"),
    # one token: TPOT is undefined and does not fail the SLO (whatever the sender put there)
    (request(num_tokens=1, ttft_ms=100, tpot_ms=0.0, slo=(200, 30)), "met"),
    (request(num_tokens=1, ttft_ms=100, tpot_ms=999.0, slo=(200, 30)), "met"),
    (request(num_tokens=1, ttft_ms=201, tpot_ms=0.0, slo=(200, 30)), "missed"),
    # no token at all, or a failed request, misses it (a failed one without an SLO has none)
    (request(num_tokens=0, ttft_ms=0.0, tpot_ms=0.0, slo=(200, 30)), "missed"),
    (request(num_tokens=5, ttft_ms=100, tpot_ms=20, slo=(200, 30), finish_reason="error"),
     "missed"),
    (request(num_tokens=5, slo=None, finish_reason="error"), "none"),
    (request(num_tokens=5, ttft_ms=100, tpot_ms=20, slo=(200, 30), finish_reason="eos"),
     "met"),
])
def test_slo_outcome(ev: RequestEvent, expected: str) -> None:
    assert slo_outcome(ev) == expected


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


# -- requests -----------------------------------------------------------------------------------
def test_attainment_goodput_and_latency_percentiles() -> None:
    agg = MetricsAggregator()
    # Received at t = 10, 11, 12, 13 s; the first started at 10 - 0.28 s.
    agg.observe(request(num_tokens=10), now_s=10.0)  # met
    agg.observe(request(num_tokens=20, ttft_ms=300.0), now_s=11.0)  # missed (TTFT)
    agg.observe(request(num_tokens=30, tpot_ms=25.0), now_s=12.0)  # met
    agg.observe(request(num_tokens=40, slo=None), now_s=13.0)  # no SLO
    s = agg.summary()["modes"]["wisp"]
    assert (s["requests"], s["requests_with_slo"], s["requests_without_slo"]) == (4, 3, 1)
    assert (s["slo_met"], s["slo_missed"], s["failed"]) == (2, 1, 0)
    assert s["slo_attainment"] == pytest.approx(2 / 3, abs=1e-4)
    window = 13.0 - (10.0 - 0.28)
    assert s["window_s"] == pytest.approx(window)
    assert s["goodput_tokens_per_s"] == pytest.approx(40 / window, rel=1e-3)
    assert s["goodput_requests_per_s"] == pytest.approx(2 / window, rel=1e-3)
    assert s["throughput_tokens_per_s"] == pytest.approx(100 / window, rel=1e-3)
    assert s["output_tokens"] == 100
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(100 + 200 * 0.97)  # [100, 100, 100, 300]
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(20 + 5 * 0.97)  # [20, 20, 20, 25]
    assert s["e2e_ms"] == {"p50": 280.0, "p90": 280.0, "p99": 280.0}

    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "met"}) == 2
    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "missed"}) == 1
    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "none"}) == 1
    assert sample(agg, "wisp_output_tokens_total", {"mode": "wisp"}) == 100
    assert sample(agg, "wisp_goodput_tokens_total", {"mode": "wisp"}) == 40  # met only
    assert s["goodput_note"] == ("1 of 4 requests carried no SLO and are not counted in "
                                 "goodput or attainment")
    assert s["throughput_requests_per_s"] == pytest.approx(4 / window, rel=1e-3)
    assert sample(agg, "wisp_ttft_seconds_count", {"mode": "wisp"}) == 4
    assert sample(agg, "wisp_ttft_seconds_sum", {"mode": "wisp"}) == pytest.approx(0.6)
    assert sample(agg, "wisp_ttft_seconds_bucket", {"mode": "wisp", "le": "0.1"}) == 3
    assert sample(agg, "wisp_tpot_seconds_count", {"mode": "wisp"}) == 4
    assert sample(agg, "wisp_e2e_seconds_sum", {"mode": "wisp"}) == pytest.approx(4 * 0.28)


def test_modes_are_kept_apart_and_failed_requests_skip_latency() -> None:
    agg = MetricsAggregator()
    agg.observe(request("sled", num_tokens=8), now_s=1.0)
    agg.observe(request("centralized", num_tokens=3, ttft_ms=50.0), now_s=1.0)
    agg.observe(request("sled", num_tokens=2, ttft_ms=5000.0, tpot_ms=1.0, e2e_ms=5001.0,
                        finish_reason="error"), now_s=2.0)
    s = agg.summary()["modes"]
    assert set(s) == {"sled", "centralized"}
    sled = s["sled"]
    assert (sled["requests"], sled["failed"], sled["slo_met"], sled["slo_missed"]) == \
        (2, 1, 1, 1)
    assert sled["output_tokens"] == 10  # a failed request's tokens were still produced
    assert sled["ttft_ms"]["p99"] == pytest.approx(100.0)  # the failed one is left out
    assert sled["tpot_ms"]["p99"] == pytest.approx(20.0)
    assert sled["e2e_ms"]["p99"] == pytest.approx(280.0)
    # ... but its e2e still opens the window: it started at 2 - 5.001 s
    assert sled["window_s"] == pytest.approx(5.001)
    assert s["centralized"]["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert s["centralized"]["requests"] == 1
    for name in ("wisp_e2e_seconds_count", "wisp_ttft_seconds_count", "wisp_tpot_seconds_count"):
        assert sample(agg, name, {"mode": "sled"}) == 1
    assert sample(agg, "wisp_requests_total", {"mode": "sled", "slo": "missed"}) == 1
    assert sample(agg, "wisp_requests_total", {"mode": "centralized", "slo": "met"}) == 1


def test_undefined_latencies_are_not_sampled() -> None:
    agg = MetricsAggregator()
    agg.observe(request(num_tokens=0, ttft_ms=0.0, tpot_ms=0.0, e2e_ms=50.0), now_s=1.0)
    agg.observe(request(num_tokens=1, ttft_ms=70.0, tpot_ms=0.0, e2e_ms=70.0), now_s=1.0)
    s = agg.summary()["modes"]["wisp"]
    assert (s["requests"], s["slo_met"], s["slo_missed"]) == (2, 1, 1)
    assert s["e2e_ms"]["p50"] == pytest.approx(60.0)  # both
    assert s["ttft_ms"]["p99"] == pytest.approx(70.0)  # the one-token request only
    assert s["tpot_ms"] == {"p50": None, "p90": None, "p99": None}  # neither
    assert sample(agg, "wisp_ttft_seconds_count", {"mode": "wisp"}) == 1
    assert sample(agg, "wisp_tpot_seconds_count", {"mode": "wisp"}) is None


def test_goodput_is_unknown_not_zero_without_an_slo() -> None:
    agg = MetricsAggregator()
    agg.observe(request("sled", num_tokens=10, slo=None), now_s=1.0)
    agg.observe(request("sled", num_tokens=20, slo=None), now_s=2.0)
    agg.observe(request("wisp", num_tokens=10, ttft_ms=500.0), now_s=2.0)  # missed
    modes = agg.summary()["modes"]
    sled = modes["sled"]
    assert sled["goodput_tokens_per_s"] is None and sled["goodput_requests_per_s"] is None
    assert sled["slo_attainment"] is None and sled["goodput_note"] == NO_SLO_NOTE
    assert sled["requests_without_slo"] == 2
    assert sled["throughput_tokens_per_s"] == pytest.approx(30 / 1.28, abs=1e-3)  # measured
    # Absent from Prometheus (a 0 would read as "every request missed its SLO") ...
    assert sample(agg, "wisp_goodput_tokens_total", {"mode": "sled"}) is None
    # ... while a mode whose requests carried SLOs and missed them has a true 0.
    wisp = modes["wisp"]
    assert wisp["goodput_tokens_per_s"] == 0.0 and wisp["slo_attainment"] == 0.0
    assert wisp["goodput_note"] is None
    assert sample(agg, "wisp_goodput_tokens_total", {"mode": "wisp"}) == 0
    # A mode known only from its rounds has no finished request yet.
    agg.observe(round_event("ucb"))
    ucb = agg.summary()["modes"]["ucb"]
    assert ucb["goodput_tokens_per_s"] is None and ucb["goodput_note"] == \
        "no finished request yet"


def test_live_throughput_covers_the_recent_window() -> None:
    now = [100.0]
    agg = MetricsAggregator(live_window_s=10.0, clock=lambda: now[0])
    agg.observe(request(num_tokens=10, e2e_ms=2000.0), now_s=100.0)  # started at 98 s
    agg.observe(request(num_tokens=30, e2e_ms=1000.0), now_s=101.0)
    # 3 s since the first request started: shorter than the window, so over those 3 s.
    live = agg.summary(now_s=101.0)["modes"]["wisp"]["live"]
    assert live == {"window_s": 3.0, "requests_per_s": pytest.approx(2 / 3, abs=1e-4),
                    "tokens_per_s": pytest.approx(40 / 3, abs=1e-3)}
    # At 109 s both are within the last 10 s; at 110.5 s the first has left it.
    live = agg.summary(now_s=109.0)["modes"]["wisp"]["live"]
    assert (live["window_s"], live["tokens_per_s"]) == (10.0, 4.0)
    live = agg.summary(now_s=110.5)["modes"]["wisp"]["live"]
    assert (live["tokens_per_s"], live["requests_per_s"]) == (3.0, 0.1)
    now[0] = 200.0  # idle: live throughput is a true 0, the whole-run numbers stay
    s = agg.summary()["modes"]["wisp"]
    assert (s["live"]["tokens_per_s"], s["live"]["requests_per_s"]) == (0.0, 0.0)
    assert s["throughput_tokens_per_s"] == pytest.approx(40 / 3, abs=1e-3)
    assert agg.summary()["live_window_s"] == 10.0
    with pytest.raises(ValueError, match="live_window_s"):
        MetricsAggregator(live_window_s=0.0)


def test_refusals_by_mode_and_code() -> None:
    agg = MetricsAggregator()
    agg.observe(refusal("prompt_too_long", "wisp"))
    agg.observe(refusal("prompt_too_long", "wisp"))
    agg.observe(refusal("overloaded", "centralized"))
    agg.observe(refusal("unknown_session", None))  # a resume: its mode is unknown
    agg.observe(refusal("from_a_newer_peer", "sled"))  # a code this build does not know
    s = agg.summary()
    assert s["refusals"] == {
        "total": 5,
        "by_code": {"other": 1, "overloaded": 1, "prompt_too_long": 2, "unknown_session": 1},
        "by_mode": {"centralized": 1, "sled": 1, "unknown": 1, "wisp": 2},
        "counts": [{"mode": "centralized", "code": "overloaded", "count": 1},
                   {"mode": "sled", "code": ERROR_OVERFLOW, "count": 1},
                   {"mode": UNKNOWN_MODE, "code": "unknown_session", "count": 1},
                   {"mode": "wisp", "code": "prompt_too_long", "count": 2}],
    }
    assert s["modes"]["wisp"]["refused"] == 2 and s["modes"]["wisp"]["requests"] == 0
    assert set(s["modes"]) == {"wisp", "centralized", "sled"}  # no "unknown" mode
    assert sample(agg, "wisp_refusals_total", {"mode": "wisp", "code": "prompt_too_long"}) == 2
    assert sample(agg, "wisp_refusals_total", {"mode": UNKNOWN_MODE,
                                               "code": "unknown_session"}) == 1
    assert sample(agg, "wisp_refusals_total", {"mode": "sled", "code": ERROR_OVERFLOW}) == 1
    assert s["events"]["received"] == {"refusal": 5}
    empty = MetricsAggregator().summary()["refusals"]
    assert empty == {"total": 0, "by_code": {}, "by_mode": {}, "counts": []}


def test_single_request_window_is_its_e2e() -> None:
    agg = MetricsAggregator()
    agg.observe(request(num_tokens=10, e2e_ms=500.0), now_s=3.0)
    s = agg.summary()["modes"]["wisp"]
    assert s["window_s"] == pytest.approx(0.5)
    assert s["goodput_tokens_per_s"] == pytest.approx(20.0)
    assert s["goodput_requests_per_s"] == pytest.approx(2.0)


def test_observe_uses_the_clock_when_no_time_is_given() -> None:
    now = [100.0]
    agg = MetricsAggregator(clock=lambda: now[0])
    agg.observe(request(num_tokens=10, e2e_ms=1000.0))
    now[0] = 102.0
    agg.observe(request(num_tokens=10, e2e_ms=500.0))
    assert agg.summary()["modes"]["wisp"]["window_s"] == pytest.approx(3.0)  # 99 .. 102


def test_request_stats_are_reported_apart_from_rounds() -> None:
    # The edge publishes each round and then the request with its totals: counting both in
    # the same numbers would count every round twice.
    agg = MetricsAggregator()
    agg.observe(round_event("sled", drafted=4, accepted=3))
    agg.observe(round_event("sled", drafted=4, accepted=1, round=1))
    agg.observe(request("sled", num_tokens=6,
                        stats=GenerateStats(rounds=2, drafted=8, accepted=4)), now_s=1.0)
    agg.observe(request("sled", num_tokens=3, finish_reason="error",
                        stats=GenerateStats(rounds=1, drafted=0, accepted=0)), now_s=1.0)
    s = agg.summary()["modes"]["sled"]
    assert (s["rounds"], s["drafted"], s["accepted"]) == (2, 8, 4)
    assert s["per_request"] == {"rounds": 3, "drafted": 8, "accepted": 4, "mean_rounds": 1.5,
                                "tokens_per_round": 3.0}
    assert sample(agg, "wisp_request_rounds_total", {"mode": "sled"}) == 3
    assert sample(agg, "wisp_draft_tokens_total", {"mode": "sled"}) == 8


# -- rounds, verdicts, batches, errors ----------------------------------------------------------
def test_acceptance_length_rate_and_wasted_drafting() -> None:
    agg = MetricsAggregator()
    for drafted, accepted, wasted in ((4, 4, 0.0), (4, 1, 30.0), (6, 3, 12.5), (0, 0, 0.0)):
        agg.observe(round_event("ucb", drafted=drafted, accepted=accepted,
                                wasted_draft_ms=wasted))
    s = agg.summary()["modes"]["ucb"]
    assert (s["rounds"], s["drafted"], s["accepted"]) == (4, 14, 8)
    assert s["mean_acceptance_length"] == pytest.approx(2.0)
    assert s["acceptance_rate"] == pytest.approx(8 / 14, abs=1e-4)
    assert s["wasted_draft_s"] == pytest.approx(0.0425)
    # 0 + 3 + 3 + 0 rejected tokens over 12 committed tokens.
    assert s["wasted_tokens"] == 6 and s["draft_s"] == pytest.approx(0.16)
    assert s["wasted_tokens_per_committed"] == pytest.approx(6 / 12, abs=1e-4)
    assert s["wasted_draft_ms_per_committed"] == pytest.approx(42.5 / 12, abs=1e-4)
    assert sample(agg, "wisp_wasted_draft_tokens_total", {"mode": "ucb"}) == 6
    assert s["requests"] == 0 and s["slo_attainment"] is None and s["window_s"] == 0.0
    assert s["per_request"]["mean_rounds"] is None
    assert sample(agg, "wisp_draft_tokens_total", {"mode": "ucb"}) == 14
    assert sample(agg, "wisp_accepted_tokens_total", {"mode": "ucb"}) == 8
    assert sample(agg, "wisp_wasted_draft_seconds_total", {"mode": "ucb"}) == \
        pytest.approx(0.0425)
    assert sample(agg, "wisp_acceptance_length_count", {"mode": "ucb"}) == 4
    assert sample(agg, "wisp_acceptance_length_bucket", {"mode": "ucb", "le": "1.0"}) == 2
    assert agg.summary()["events"]["received"] == {"round": 4}


def test_verifier_batch_sizes_per_mode_come_from_rounds() -> None:
    agg = MetricsAggregator()
    for size in (1, 2, 3, 10):
        agg.observe(round_event("wisp", batch_size=size))
    agg.observe(round_event("centralized", drafted=0, accepted=0, batch_size=7))
    modes = agg.summary()["modes"]
    assert modes["wisp"]["batch_size"] == {"mean": 4.0, "p50": 2.5, "p90": 7.9,
                                           "p99": pytest.approx(9.79)}
    assert modes["centralized"]["batch_size"]["p50"] == 7.0
    assert modes["centralized"]["mean_acceptance_length"] == 0.0


def test_verdicts_are_counted_from_the_verifiers_side() -> None:
    agg = MetricsAggregator()
    agg.observe(verdict(num_drafted=1, num_accepted=1, draft_features=FEATURES))
    agg.observe(verdict(num_drafted=4, num_accepted=2, greedy=False))
    agg.observe(verdict(num_drafted=0, num_accepted=0))  # an empty draft (centralized)
    v = agg.summary()["verdicts"]
    assert v == {"count": 3, "greedy": 2, "with_features": 1, "drafted": 5, "accepted": 3,
                 "mean_acceptance_length": 1.0, "acceptance_rate": 0.6}
    assert agg.summary()["modes"] == {}  # verdicts carry no mode: never mixed with rounds
    assert sample(agg, "wisp_verdict_draft_tokens_total", {}) == 5
    assert sample(agg, "wisp_verdict_accepted_tokens_total", {}) == 3
    assert sample(agg, "wisp_metrics_events_total", {"kind": "verdict"}) == 3


def test_batches_and_queue_depth() -> None:
    agg = MetricsAggregator()
    for size, ms, depth in ((2, 10.0, 5), (4, 20.0, 3), (6, 30.0, 0)):
        agg.observe(batch("v1", size=size, batch_ms=ms, queue_depth=depth))
    agg.observe(batch("v2", size=1, batch_ms=40.0, queue_depth=7))
    b = agg.summary()["batches"]
    assert b["count"] == 4 and b["mean_size"] == pytest.approx(13 / 4)
    assert b["batch_ms"]["p50"] == pytest.approx(25.0)
    assert b["queue_depth"] == {"v1": 0, "v2": 7}  # the latest per verifier
    assert sample(agg, "wisp_queue_depth", {"verifier_id": "v1"}) == 0
    assert sample(agg, "wisp_queue_depth", {"verifier_id": "v2"}) == 7
    assert sample(agg, "wisp_batch_size_sum", {}) == 13
    assert sample(agg, "wisp_batch_seconds_count", {}) == 4
    assert sample(agg, "wisp_batch_seconds_sum", {}) == pytest.approx(0.1)


def test_errors_by_service_and_code() -> None:
    agg = MetricsAggregator()
    agg.observe(error("gpu-verifier", "base_mismatch"))
    agg.observe(error("gpu-verifier", "base_mismatch"))
    agg.observe(ErrorEvent(ts_ms=1.0, service="edge-drafter", code="internal"))  # no sid
    assert agg.summary()["errors"] == [
        {"service": "edge-drafter", "code": "internal", "count": 1},
        {"service": "gpu-verifier", "code": "base_mismatch", "count": 2},
    ]
    assert sample(agg, "wisp_errors_total",
                  {"service": "gpu-verifier", "code": "base_mismatch"}) == 2
    assert sample(agg, "wisp_errors_total", {"service": "edge-drafter", "code": "internal"}) == 1


def test_error_series_are_capped() -> None:
    agg = MetricsAggregator()
    for i in range(MAX_ERROR_SERIES):
        agg.observe(error("svc", f"code{i}"))
    agg.observe(error("svc", "code5"))  # a known pair keeps its own series
    agg.observe(error("svc", "brand_new"))  # new pairs past the cap share one series,
    agg.observe(error("another-service", "x"))  # whatever their service
    errors = {(e["service"], e["code"]): e["count"] for e in agg.summary()["errors"]}
    assert len(errors) == MAX_ERROR_SERIES + 1
    assert errors[("svc", "code5")] == 2
    assert errors[(ERROR_OVERFLOW, ERROR_OVERFLOW)] == 2
    assert ("svc", "brand_new") not in errors and ("another-service", "x") not in errors
    series = [s for s in all_samples(agg) if s[0] == "wisp_errors_total"]
    assert len(series) == MAX_ERROR_SERIES + 1
    assert sample(agg, "wisp_errors_total",
                  {"service": ERROR_OVERFLOW, "code": ERROR_OVERFLOW}) == 2


# -- scheduling and admission ---------------------------------------------------------------------
def test_predicted_and_observed_batch_times_side_by_side() -> None:
    agg = MetricsAggregator()
    for predicted, observed in ((10.0, 12.0), (20.0, 18.0), (30.0, 40.0)):
        agg.observe(schedule(predicted_ms=predicted, observed_ms=observed))
    agg.observe(schedule(predicted_ms=0.0, observed_ms=50.0))  # no estimator yet
    s = agg.summary()["schedule"]["wisp"]
    assert (s["batches"], s["estimated"]) == (4, 3)
    assert s["predicted_ms"] == {"mean": 20.0, "p50": 20.0, "p99": pytest.approx(29.8)}
    assert s["observed_ms"]["mean"] == pytest.approx(30.0)  # every batch, 50 ms included
    assert s["observed_ms"]["p50"] == pytest.approx(29.0)
    # Only batches with an estimate are judged: |2|/12, |-2|/18, |10|/40; bias (2 - 2 + 10)/3.
    assert s["estimator"]["window"] == 3
    assert s["estimator"]["mape"] == pytest.approx((2 / 12 + 2 / 18 + 10 / 40) / 3, abs=1e-4)
    assert s["estimator"]["bias_ms"] == pytest.approx(10 / 3, abs=1e-3)
    assert sample(agg, "wisp_schedule_predicted_seconds_count", {"policy": "wisp"}) == 3
    assert sample(agg, "wisp_schedule_observed_seconds_count", {"policy": "wisp"}) == 4
    assert sample(agg, "wisp_schedule_observed_seconds_sum", {"policy": "wisp"}) == \
        pytest.approx(0.12)
    assert sample(agg, "wisp_estimator_mape", {"policy": "wisp"}) == \
        pytest.approx(s["estimator"]["mape"], abs=1e-4)
    assert sample(agg, "wisp_estimator_bias_seconds", {"policy": "wisp"}) == \
        pytest.approx(10 / 3 / 1000, abs=1e-6)
    assert sample(agg, "wisp_estimator_guard_seconds", {"verifier_id": "v1"}) == 0.0015


def test_estimator_error_covers_its_recent_window() -> None:
    agg = MetricsAggregator()
    for _ in range(ESTIMATOR_WINDOW):
        agg.observe(schedule(predicted_ms=5.0, observed_ms=10.0))  # 50 % off, long ago
    for _ in range(ESTIMATOR_WINDOW):
        agg.observe(schedule(predicted_ms=10.0, observed_ms=10.0))  # spot on since
    e = agg.summary()["schedule"]["wisp"]["estimator"]
    assert e == {"window": ESTIMATOR_WINDOW, "mape": 0.0, "bias_ms": 0.0}


def test_deadlines_late_dispatches_and_decision_time_per_policy() -> None:
    agg = MetricsAggregator()
    agg.observe(schedule("wisp", met=3, missed=1, late=1, decision_ms=0.1))
    agg.observe(schedule("wisp", met=4, missed=0, late=0, decision_ms=0.3))
    agg.observe(schedule("fcfs", predicted_ms=0.0, met=1, missed=3, late=2, decision_ms=0.01))
    s = agg.summary()["schedule"]
    assert list(s) == ["fcfs", "wisp"]
    wisp, fcfs = s["wisp"], s["fcfs"]
    assert (wisp["deadlines_met"], wisp["deadlines_missed"], wisp["late_dispatched"]) == \
        (7, 1, 1)
    assert wisp["violation_rate"] == pytest.approx(1 / 8)
    assert wisp["decision_ms"] == {"p50": pytest.approx(0.2), "p99": pytest.approx(0.298)}
    assert fcfs["violation_rate"] == pytest.approx(0.75) and fcfs["late_dispatched"] == 2
    # FCFS formed its batches without an estimate: nothing to compare, times still observed.
    assert fcfs["predicted_ms"] == {"mean": None, "p50": None, "p99": None}
    assert fcfs["estimator"] == {"window": 0, "mape": None, "bias_ms": None}
    assert fcfs["observed_ms"]["mean"] == pytest.approx(12.0)
    assert sample(agg, "wisp_schedule_deadlines_total",
                  {"policy": "wisp", "outcome": "missed"}) == 1
    assert sample(agg, "wisp_schedule_deadlines_total",
                  {"policy": "fcfs", "outcome": "met"}) == 1
    assert sample(agg, "wisp_schedule_late_dispatched_total", {"policy": "fcfs"}) == 2
    assert sample(agg, "wisp_schedule_decision_seconds_count", {"policy": "wisp"}) == 2
    assert sample(agg, "wisp_estimator_mape", {"policy": "fcfs"}) is None


def test_a_batch_with_no_deadline_judged_has_no_violation_rate() -> None:
    agg = MetricsAggregator()
    agg.observe(schedule(met=0, missed=0))
    assert agg.summary()["schedule"]["wisp"]["violation_rate"] is None


def test_policy_series_are_capped() -> None:
    agg = MetricsAggregator()
    for i in range(MAX_POLICY_SERIES + 3):
        agg.observe(schedule(f"policy{i}"))
    s = agg.summary()["schedule"]
    assert len(s) == MAX_POLICY_SERIES + 1 and s[ERROR_OVERFLOW]["batches"] == 3
    assert sample(agg, "wisp_schedule_observed_seconds_count", {"policy": ERROR_OVERFLOW}) == 3


def test_admission_outcomes_and_the_latest_decision() -> None:
    agg = MetricsAggregator()
    agg.observe(admission("admitted", predicted_round_ms=40.0, budget_ms=60.0))
    agg.observe(admission("queued", predicted_round_ms=70.0, budget_ms=60.0))
    agg.observe(admission("admitted", verifier_id="v2", predicted_round_ms=20.0, budget_ms=0.0))
    agg.observe(admission("refused", predicted_round_ms=84.0, budget_ms=60.0,
                          retry_after_ms=1500.0))
    a = agg.summary()["admission"]
    assert (a["admitted"], a["queued"], a["refused"]) == (2, 1, 1)
    assert a["refusal_rate"] == pytest.approx(1 / 3, abs=1e-4)  # of final decisions only
    assert a["last"] == {"sid": SID, "outcome": "refused", "verifier_id": "v1",
                         "predicted_round_ms": 84.0, "budget_ms": 60.0,
                         "retry_after_ms": 1500.0}
    assert a["by_verifier"] == {
        "v1": {"outcome": "refused", "predicted_round_ms": 84.0, "budget_ms": 60.0,
               "retry_after_ms": 1500.0},
        "v2": {"outcome": "admitted", "predicted_round_ms": 20.0, "budget_ms": 0.0,
               "retry_after_ms": 0.0}}
    assert sample(agg, "wisp_admissions_total", {"outcome": "admitted"}) == 2
    assert sample(agg, "wisp_admissions_total", {"outcome": "refused"}) == 1
    assert sample(agg, "wisp_admission_predicted_round_seconds", {"verifier_id": "v1"}) == \
        pytest.approx(0.084)
    assert sample(agg, "wisp_admission_budget_seconds", {"verifier_id": "v2"}) == 0.0
    # A refusal with no verifier to place on still counts, and is the latest.
    agg.observe(admission("refused", verifier_id=None, predicted_round_ms=0.0, budget_ms=0.0))
    a = agg.summary()["admission"]
    assert a["refused"] == 2 and a["last"]["verifier_id"] is None
    assert set(a["by_verifier"]) == {"v1", "v2"}


def test_no_admission_yet() -> None:
    a = MetricsAggregator().summary()["admission"]
    assert a == {"admitted": 0, "queued": 0, "refused": 0, "refusal_rate": None, "last": None,
                 "by_verifier": {}}


def test_observe_refuses_what_is_not_an_event() -> None:
    agg = MetricsAggregator()
    with pytest.raises(TypeError):
        agg.observe({"type": "request"})  # type: ignore[arg-type]
    assert agg.summary()["events"] == {"received": {}, "malformed": {}}


# -- bad input: refused by decode, counted by the service, nothing else changes ------------------
def _payload(ev: Any, **changes: Any) -> bytes:
    """``ev`` on the wire with ``changes`` applied to its map (a dotted name reaches into a
    nested object; None as a value removes the field)."""
    raw = msgspec.msgpack.decode(encode(ev))
    for name, value in changes.items():
        *path, last = name.split(".")
        target = raw
        for part in path:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return msgspec.msgpack.encode(raw)


# name: (payload, a fragment of decode's reason: each case fails for the reason it is about)
BAD_PAYLOADS: dict[str, tuple[bytes, str]] = {
    "not msgpack": (b"\xc1 not msgpack", "not valid msgpack"),
    "empty": (b"", "payload is empty"),
    "truncated": (encode(request())[:-3], "not valid msgpack"),
    "not a map": (msgspec.msgpack.encode([1, 2, 3]), "Expected `object`, got `array`"),
    "no type tag": (_payload(request(), type=None), "missing required field `type`"),
    "unknown tag": (_payload(error(), type="heartbeat"), "Invalid value 'heartbeat'"),
    "old untyped event": (msgspec.msgpack.encode(
        {"kind": "request", "ts_ms": 1.0, "fields": {"mode": "wisp", "num_tokens": 1}}),
        "missing required field `type`"),
    "other protocol version": (_payload(request(), v=2), "unsupported protocol version 2"),
    "unknown field": (_payload(request(), slo_met=True), "unknown field `slo_met`"),
    "missing field": (_payload(request(), num_tokens=None), "missing required field `num_tokens`"),
    "missing nested field": (_payload(request(), **{"timings.e2e_ms": None}),
                             "missing required field `e2e_ms`"),
    "bool is not a count": (_payload(request(), num_tokens=True), "got `bool`"),
    "negative count": (_payload(request(), num_tokens=-1), ">= 0 - at `$.num_tokens`"),
    "string count": (_payload(round_event(), drafted="2"), "got `str` - at `$.drafted`"),
    "unknown mode": (_payload(request(), mode="turbo"), "Invalid enum value 'turbo'"),
    "unknown finish reason": (_payload(request(), finish_reason="timeout"),
                              "Invalid enum value 'timeout'"),
    "negative duration": (_payload(request(), **{"timings.e2e_ms": -1.0}),
                          "at `$.timings.e2e_ms`"),
    "NaN duration": (_payload(round_event(), wasted_draft_ms=math.nan),
                     "at `$.wasted_draft_ms`"),
    "infinite budget": (_payload(round_event(), budget_ms=math.inf), "at `$.budget_ms`"),
    "SLO bound of 0 (no SLO is None)": (_payload(request(), **{"slo.ttft_ms": 0.0}),
                                        "> 0.0 - at `$.slo.ttft_ms`"),
    "request accepted > drafted": (_payload(request(), **{"stats.accepted": 13}),
                                   "accepted (13) exceeds drafted (12)"),
    "round accepted > drafted": (_payload(round_event(drafted=2, accepted=2), accepted=3),
                                 "accepted (3) exceeds drafted (2)"),
    "bad sid": (_payload(round_event(), sid="a.b"), "at `$.sid`"),
    "verifier id with a space": (_payload(batch(), verifier_id="a b"), "at `$.verifier_id`"),
    "batch without batch_ms": (_payload(batch(), batch_ms=None),
                               "missing required field `batch_ms`"),
    "negative queue depth": (_payload(batch(), queue_depth=-1), "at `$.queue_depth`"),
    "error without code": (_payload(error(), code=None), "missing required field `code`"),
    "error service with a wildcard": (_payload(error(), service="edge.*"), "at `$.service`"),
    "verdict feature row too short": (_payload(verdict(), draft_features=[[0.1, 0.2]]),
                                      "at `$.draft_features[0]`"),
    "verdict negative count": (_payload(verdict(), num_drafted=-1), "at `$.num_drafted`"),
    "unknown admission outcome": (_payload(admission(), outcome="maybe"),
                                  "Invalid enum value 'maybe'"),
    "negative deadlines met": (_payload(schedule(), deadlines_met=-1), "at `$.deadlines_met`"),
    "schedule without a policy": (_payload(schedule(), policy=None),
                                  "missing required field `policy`"),
}


@pytest.mark.parametrize(("data", "reason"), BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_decode_refuses_malformed_events(data: bytes, reason: str) -> None:
    with pytest.raises(WispError) as info:
        decode(AnyEvent, data)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert reason in info.value.message


def _fed_service() -> MetricsService:
    service = MetricsService(MetricsConfig())
    for ev in (request(), request("sled", slo=None), round_event(wasted_draft_ms=3.0),
               verdict(draft_features=FEATURES), batch(queue_depth=2), error(), schedule(),
               admission("refused", retry_after_ms=500.0)):
        service.handle("wisp.events.x", encode(ev), now_s=5.0)
    return service


@pytest.mark.parametrize("data", [data for data, _ in BAD_PAYLOADS.values()],
                         ids=BAD_PAYLOADS.keys())
def test_malformed_payloads_are_counted_and_change_nothing_else(data: bytes) -> None:
    service = _fed_service()
    agg = service.aggregator
    before, samples_before = agg.summary(), all_samples(agg)
    service.handle("wisp.events.request", data, now_s=6.0)  # never raises
    after, samples_after = agg.summary(), all_samples(agg)
    assert after["events"]["malformed"] == {"undecodable": 1}
    after["events"]["malformed"] = before["events"]["malformed"]
    assert after == before
    key = ("wisp_metrics_malformed_events_total", (("kind", "undecodable"),))
    assert samples_after.pop(key) == 1
    assert samples_after == samples_before


def test_the_service_feeds_decoded_events_and_survives_aggregator_bugs() -> None:
    class Broken(MetricsAggregator):
        def _on_round(self, ev: RoundEvent, now_s: float) -> None:
            raise RuntimeError("a bug")

        _handlers = {**MetricsAggregator._handlers, RoundEvent: _on_round}

    service = MetricsService(MetricsConfig(), aggregator=Broken())
    service.handle("wisp.events.request", encode(request()), now_s=1.0)
    service.handle("wisp.events.round", encode(round_event()), now_s=1.0)  # logged, counted
    service.handle("wisp.events.request", encode(request(num_tokens=5)), now_s=2.0)
    s = service.aggregator.summary()
    assert s["modes"]["wisp"]["requests"] == 2 and s["modes"]["wisp"]["output_tokens"] == 15
    assert s["events"] == {"received": {"request": 2, "round": 1},
                           "malformed": {"round": 1}}


def test_percentile_samples_are_bounded() -> None:
    agg = MetricsAggregator(max_samples=3)
    for ttft in (1000.0, 1.0, 2.0, 3.0):
        agg.observe(request(ttft_ms=ttft), now_s=1.0)
    for ms in (1000.0, 1.0, 2.0, 3.0):
        agg.observe(batch(batch_ms=ms))
    s = agg.summary()
    assert s["modes"]["wisp"]["ttft_ms"]["p99"] == pytest.approx(3.0, abs=0.1)
    assert s["modes"]["wisp"]["requests"] == 4
    assert s["batches"]["batch_ms"]["p99"] == pytest.approx(3.0, abs=0.1)
    assert s["batches"]["count"] == 4
    # Prometheus histograms still see every observation.
    assert sample(agg, "wisp_ttft_seconds_count", {"mode": "wisp"}) == 4


def test_own_registry_and_dashboard_page() -> None:
    a, b = MetricsAggregator(), MetricsAggregator()  # two instances do not collide
    a.observe(request(), now_s=1.0)
    assert sample(b, "wisp_requests_total", {"mode": "wisp", "slo": "met"}) is None
    assert b"wisp_requests_total" in generate_latest(a.registry)
    # The page is static: its script reads /summary at the configured interval.
    page = dashboard_page(2.5)
    assert "const REFRESH_MS = 2500;" in page and 'fetch("/summary"' in page
    assert "__REFRESH" not in page and "every 2.5 s" in page
    assert "n/a \\u2014 no SLO" in page  # the JS escape of "n/a — no SLO"
    assert "http://" not in page and "https://" not in page  # no external assets
    assert "<script src" not in page and "<link" not in page
    assert MetricsService(MetricsConfig(dashboard_refresh_s=0.5))._page == dashboard_page(0.5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="refresh_s"):
            dashboard_page(bad)
        with pytest.raises(ValueError, match="dashboard_refresh_s"):
            MetricsConfig(dashboard_refresh_s=bad)
