"""The metrics aggregator's math on hand-made events (no NATS, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from common.protocol import Event
from services.metrics.aggregate import (
    MalformedEvent,
    MetricsAggregator,
    percentile,
    slo_outcome,
)
from services.metrics.service import render_dashboard


def event(kind: str, **fields: Any) -> Event:
    return Event(kind=kind, ts_ms=0.0, fields=fields)


def request(mode: str = "wisp", *, num_tokens: int = 10, ttft_ms: float | None = 100.0,
            tpot_ms: float | None = 20.0, e2e_ms: float = 280.0,
            slo: tuple[float, float] | None = (200.0, 30.0), **extra: Any) -> Event:
    fields: dict[str, Any] = dict(mode=mode, num_tokens=num_tokens, ttft_ms=ttft_ms,
                                  tpot_ms=tpot_ms, e2e_ms=e2e_ms, finish_reason="length",
                                  **extra)
    if slo is not None:
        fields.update(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1])
    return event("request", **fields)


def sample(agg: MetricsAggregator, name: str, labels: dict[str, str]) -> float | None:
    return agg.registry.get_sample_value(name, labels)


# -- SLO ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "expected"), [
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=20, slo_ttft_ms=200, slo_tpot_ms=30), "met"),
    (dict(num_tokens=5, ttft_ms=200, tpot_ms=30, slo_ttft_ms=200, slo_tpot_ms=30), "met"),
    (dict(num_tokens=5, ttft_ms=201, tpot_ms=20, slo_ttft_ms=200, slo_tpot_ms=30), "missed"),
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=31, slo_ttft_ms=200, slo_tpot_ms=30), "missed"),
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=20), "none"),
    # one token: TPOT is undefined and does not fail the SLO
    (dict(num_tokens=1, ttft_ms=100, tpot_ms=None, slo_ttft_ms=200, slo_tpot_ms=30), "met"),
    # no token at all, or a failed request, misses it
    (dict(num_tokens=0, ttft_ms=None, slo_ttft_ms=200, slo_tpot_ms=30), "missed"),
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=20, slo_ttft_ms=200, slo_tpot_ms=30,
          finish_reason="error"), "missed"),
    # the definition wins over the sender's slo_met; bounds of 0 mean "no SLO"
    (dict(num_tokens=5, ttft_ms=300, tpot_ms=20, slo_ttft_ms=200, slo_tpot_ms=30,
          slo_met=True), "missed"),
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=20, slo_ttft_ms=0.0, slo_tpot_ms=0.0,
          slo_met=False), "none"),
    (dict(num_tokens=5, ttft_ms=100, tpot_ms=20, slo_met=False), "none"),
])
def test_slo_outcome(fields: dict[str, Any], expected: str) -> None:
    assert slo_outcome(fields) == expected


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
    assert (s["slo_met"], s["slo_missed"]) == (2, 1)
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
    assert s["e2e_ms"] == {"p50": 280.0, "p90": 280.0, "p99": 280.0}

    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "met"}) == 2
    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "missed"}) == 1
    assert sample(agg, "wisp_requests_total", {"mode": "wisp", "slo": "none"}) == 1
    assert sample(agg, "wisp_output_tokens_total", {"mode": "wisp"}) == 100
    assert sample(agg, "wisp_ttft_seconds_count", {"mode": "wisp"}) == 4
    assert sample(agg, "wisp_ttft_seconds_sum", {"mode": "wisp"}) == pytest.approx(0.6)
    assert sample(agg, "wisp_ttft_seconds_bucket", {"mode": "wisp", "le": "0.1"}) == 3


def test_modes_are_kept_apart_and_failed_requests_skip_latency() -> None:
    agg = MetricsAggregator()
    agg.observe(request("sled", num_tokens=8), now_s=1.0)
    agg.observe(request("centralized", num_tokens=3, ttft_ms=50.0), now_s=1.0)
    agg.observe(event("request", mode="sled", num_tokens=2, ttft_ms=5000.0, tpot_ms=1.0,
                      e2e_ms=5001.0, slo_ttft_ms=200.0, slo_tpot_ms=30.0,
                      finish_reason="error"), now_s=2.0)
    s = agg.summary()["modes"]
    assert set(s) == {"sled", "centralized"}
    assert (s["sled"]["requests"], s["sled"]["failed"], s["sled"]["slo_missed"]) == (2, 1, 1)
    assert s["sled"]["ttft_ms"]["p99"] == pytest.approx(100.0)  # the failed one is left out
    assert s["centralized"]["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert sample(agg, "wisp_e2e_seconds_count", {"mode": "sled"}) == 1


def test_single_request_window_is_its_e2e() -> None:
    agg = MetricsAggregator()
    agg.observe(request(num_tokens=10, e2e_ms=500.0), now_s=3.0)
    s = agg.summary()["modes"]["wisp"]
    assert s["window_s"] == pytest.approx(0.5)
    assert s["goodput_tokens_per_s"] == pytest.approx(20.0)


# -- rounds, batches, errors --------------------------------------------------------------------
def test_acceptance_length_rate_and_wasted_drafting() -> None:
    agg = MetricsAggregator()
    for drafted, accepted, wasted in ((4, 4, 0.0), (4, 1, 30.0), (6, 3, 12.5), (0, 0, 0.0)):
        agg.observe(event("round", mode="ucb", round=0, drafted=drafted, accepted=accepted,
                          draft_ms=40.0, wasted_draft_ms=wasted, rtt_ms=10.0, budget_ms=-5.0))
    s = agg.summary()["modes"]["ucb"]
    assert (s["rounds"], s["drafted"], s["accepted"]) == (4, 14, 8)
    assert s["mean_acceptance_length"] == pytest.approx(2.0)
    assert s["acceptance_rate"] == pytest.approx(8 / 14, abs=1e-4)
    assert s["wasted_draft_s"] == pytest.approx(0.0425)
    assert s["requests"] == 0 and s["slo_attainment"] is None
    assert sample(agg, "wisp_draft_tokens_total", {"mode": "ucb"}) == 14
    assert sample(agg, "wisp_accepted_tokens_total", {"mode": "ucb"}) == 8
    assert sample(agg, "wisp_wasted_draft_seconds_total", {"mode": "ucb"}) == \
        pytest.approx(0.0425)
    assert sample(agg, "wisp_acceptance_length_count", {"mode": "ucb"}) == 4
    assert sample(agg, "wisp_acceptance_length_bucket", {"mode": "ucb", "le": "1.0"}) == 2


def test_batches_and_queue_depth() -> None:
    agg = MetricsAggregator()
    for size, ms, depth in ((2, 10.0, 5), (4, 20.0, 3), (6, 30.0, 0)):
        agg.observe(event("batch", verifier_id="v1", size=size, batch_ms=ms, num_linear=size,
                          num_interactions=size * 10, num_cached=100, queue_depth=depth))
    agg.observe(event("batch", verifier_id="v2", size=1, batch_ms=40.0, queue_depth=7))
    b = agg.summary()["batches"]
    assert b["count"] == 4 and b["mean_size"] == pytest.approx(13 / 4)
    assert b["batch_ms"]["p50"] == pytest.approx(25.0)
    assert b["queue_depth"] == {"v1": 0, "v2": 7}
    assert sample(agg, "wisp_queue_depth", {"verifier_id": "v2"}) == 7
    assert sample(agg, "wisp_batch_size_sum", {}) == 13
    assert sample(agg, "wisp_batch_seconds_count", {}) == 4


def test_errors_by_service_and_code() -> None:
    agg = MetricsAggregator()
    agg.observe(event("error", service="gpu-verifier", code="base_mismatch"))
    agg.observe(event("error", service="gpu-verifier", code="base_mismatch"))
    agg.observe(event("error", service="edge-drafter", code="internal"))
    assert agg.summary()["errors"] == [
        {"service": "edge-drafter", "code": "internal", "count": 1},
        {"service": "gpu-verifier", "code": "base_mismatch", "count": 2},
    ]
    assert sample(agg, "wisp_errors_total",
                  {"service": "gpu-verifier", "code": "base_mismatch"}) == 2


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    event("request", mode="wisp", e2e_ms=1.0),  # num_tokens missing
    event("request", mode="turbo", num_tokens=1, e2e_ms=1.0),  # unknown mode
    event("request", mode="wisp", num_tokens=True, e2e_ms=1.0),  # bool is not a count
    event("request", mode="wisp", num_tokens=1, e2e_ms=-1.0),
    event("round", mode="sled", drafted=2, accepted=3),  # accepted > drafted
    event("round", mode="sled", drafted="2", accepted=1),
    event("batch", size=2),  # batch_ms missing
    event("batch", size=2, batch_ms=1.0, verifier_id="a b", queue_depth=1),
    event("error", service="x"),
])
def test_malformed_events_are_counted_and_change_nothing_else(bad: Event) -> None:
    agg = MetricsAggregator()
    with pytest.raises(MalformedEvent):
        agg.observe(bad)
    s = agg.summary()
    assert s["events"]["malformed"] == {bad.kind: 1}
    assert s["modes"] == {} and s["batches"]["count"] == 0 and s["errors"] == []
    assert sample(agg, "wisp_metrics_malformed_events_total", {"kind": bad.kind}) == 1


def test_unknown_kinds_and_fields_are_ignored() -> None:
    agg = MetricsAggregator()
    assert agg.observe(event("heartbeat", anything=1)) is False
    assert agg.observe(request(num_tokens=3, new_field="x"), now_s=1.0) is True
    s = agg.summary()
    assert s["events"]["received"] == {"other": 1, "request": 1}
    assert s["events"]["malformed"] == {}
    assert s["modes"]["wisp"]["requests"] == 1


def test_percentile_samples_are_bounded() -> None:
    agg = MetricsAggregator(max_samples=3)
    for ttft in (1000.0, 1.0, 2.0, 3.0):
        agg.observe(request(ttft_ms=ttft), now_s=1.0)
    assert agg.summary()["modes"]["wisp"]["ttft_ms"]["p99"] == pytest.approx(3.0, abs=0.1)
    assert agg.summary()["modes"]["wisp"]["requests"] == 4


def test_own_registry_and_dashboard_render() -> None:
    a, b = MetricsAggregator(), MetricsAggregator()  # two instances do not collide
    a.observe(request(), now_s=1.0)
    assert sample(b, "wisp_requests_total", {"mode": "wisp", "slo": "met"}) is None
    assert b"wisp_requests_total" in generate_latest(a.registry)
    page = render_dashboard(a.summary(), refresh_s=7)
    assert 'http-equiv="refresh" content="7"' in page and "<td>wisp</td>" in page
    assert "http://" not in page and "https://" not in page  # no external assets
