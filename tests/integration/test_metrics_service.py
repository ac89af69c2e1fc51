"""The metrics service over real NATS, read back through its HTTP routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import (
    BatchEvent,
    ErrorEvent,
    GenerateStats,
    GenerateTimings,
    RequestEvent,
    RoundEvent,
    Slo,
    VerdictEvent,
    encode,
)
from common.subjects import event as event_subject
from common.transport.service import publish_event, start_http
from services.metrics.service import MetricsConfig, MetricsService

SID = "0123456789abcdef"


@pytest_asyncio.fixture
async def metrics(nc: NatsClient) -> AsyncIterator[tuple[MetricsService, str]]:
    service = MetricsService(MetricsConfig(http_port=0))
    service.nc = nc
    await service.start()
    runner, port = await start_http(service, "127.0.0.1", 0)
    try:
        yield service, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await service.stop()


def request(mode: str, *, num_tokens: int, ttft_ms: float, tpot_ms: float, e2e_ms: float,
            slo: Slo | None, finish_reason: str = "length") -> RequestEvent:
    return RequestEvent(ts_ms=1.0, sid=SID, mode=mode, num_tokens=num_tokens,
                        timings=GenerateTimings(ttft_ms=ttft_ms, tpot_ms=tpot_ms, e2e_ms=e2e_ms),
                        slo=slo, stats=GenerateStats(rounds=4, drafted=12, accepted=8),
                        finish_reason=finish_reason)


ROUND = RoundEvent(ts_ms=1.0, sid=SID, mode="wisp", round=0, drafted=5, accepted=3, committed=4,
                   draft_ms=20.0, wasted_draft_ms=8.0, rtt_ms=5.0, budget_ms=60.0, batch_size=3)


def mutated(ev: object, **changes: object) -> bytes:
    """``ev`` on the wire with some fields of its map replaced, as a faulty peer would send."""
    raw = msgspec.msgpack.decode(encode(ev))
    raw.update(changes)
    return msgspec.msgpack.encode(raw)


async def wait_for_events(service: MetricsService, n: int) -> None:
    for _ in range(500):
        s = service.aggregator.summary()["events"]
        if sum(s["received"].values()) + sum(s["malformed"].values()) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the service did not see {n} events: {s}")


def prom_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_events_reach_metrics_and_summary(metrics: tuple[MetricsService, str],
                                                nc: NatsClient) -> None:
    service, base = metrics
    slo = Slo(ttft_ms=100.0, tpot_ms=20.0)
    # Bad payloads first: none of them may stop the subscription.
    await nc.publish(event_subject("request"), b"\xc1 not msgpack")
    await nc.publish(event_subject("request"),  # a field of the wrong type
                     mutated(request("wisp", num_tokens=1, ttft_ms=1.0, tpot_ms=0.0,
                                     e2e_ms=1.0, slo=None), num_tokens="many"))
    await nc.publish(event_subject("round"), mutated(ROUND, accepted=6))  # accepted > drafted
    await nc.publish(event_subject("heartbeat"), mutated(ROUND, type="heartbeat"))  # no such tag
    # Real events, published the way services publish them.
    await publish_event(nc, request("wisp", num_tokens=12, ttft_ms=80.0, tpot_ms=10.0,
                                    e2e_ms=190.0, slo=slo))  # met
    await publish_event(nc, request("wisp", num_tokens=12, ttft_ms=180.0, tpot_ms=10.0,
                                    e2e_ms=290.0, slo=slo))  # missed (TTFT)
    await publish_event(nc, ROUND)
    await publish_event(nc, VerdictEvent(ts_ms=1.0, sid=SID, round=0, device_id="laptop",
                                         greedy=True, num_drafted=5, num_accepted=3,
                                         draft_features=[[0.9, 0.3, 0.5, 0.1, float(i), 0.5, 1.0]
                                                         for i in range(5)]))
    await publish_event(nc, BatchEvent(ts_ms=1.0, verifier_id="v0", batch_id="b0", size=3,
                                       batch_ms=12.0, num_linear=9, num_interactions=300,
                                       num_cached=90, queue_depth=4))
    await publish_event(nc, ErrorEvent(ts_ms=1.0, service="edge-drafter", code="capacity"))
    await nc.flush()
    await wait_for_events(service, 10)

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
            samples = prom_samples(await resp.text())
        async with http.get(f"{base}/summary") as resp:
            assert resp.status == 200
            summary = await resp.json()
        async with http.get(f"{base}/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200

    assert samples[("wisp_requests_total", (("mode", "wisp"), ("slo", "met")))] == 1
    assert samples[("wisp_requests_total", (("mode", "wisp"), ("slo", "missed")))] == 1
    assert samples[("wisp_output_tokens_total", (("mode", "wisp"),))] == 24
    assert samples[("wisp_ttft_seconds_count", (("mode", "wisp"),))] == 2
    assert samples[("wisp_draft_tokens_total", (("mode", "wisp"),))] == 5  # the good round only
    assert samples[("wisp_accepted_tokens_total", (("mode", "wisp"),))] == 3
    assert samples[("wisp_verdict_accepted_tokens_total", ())] == 3
    assert samples[("wisp_queue_depth", (("verifier_id", "v0"),))] == 4
    assert samples[("wisp_batch_size_count", ())] == 1
    assert samples[("wisp_errors_total", (("code", "capacity"), ("service", "edge-drafter")))] == 1
    assert samples[("wisp_metrics_malformed_events_total", (("kind", "undecodable"),))] == 4
    for kind in ("request", "round", "verdict", "batch", "error"):
        expected = 2 if kind == "request" else 1
        assert samples[("wisp_metrics_events_total", (("kind", kind),))] == expected

    wisp = summary["modes"]["wisp"]
    assert (wisp["requests"], wisp["slo_met"], wisp["slo_attainment"]) == (2, 1, 0.5)
    assert (wisp["rounds"], wisp["drafted"], wisp["accepted"]) == (1, 5, 3)
    assert wisp["mean_acceptance_length"] == 3.0 and wisp["wasted_draft_s"] == 0.008
    assert wisp["per_request"]["rounds"] == 8
    assert summary["verdicts"]["count"] == 1 and summary["verdicts"]["with_features"] == 1
    assert summary["batches"]["count"] == 1 and summary["batches"]["queue_depth"] == {"v0": 4}
    assert summary["errors"] == [{"service": "edge-drafter", "code": "capacity", "count": 1}]
    assert summary["events"] == {
        "received": {"batch": 1, "error": 1, "request": 2, "round": 1, "verdict": 1},
        "malformed": {"undecodable": 4},
    }
    assert "<td>wisp</td>" in page and "<td>undecodable</td>" in page

    # Still serving after the bad events.
    await publish_event(nc, request("sled", num_tokens=1, ttft_ms=5.0, tpot_ms=0.0, e2e_ms=5.0,
                                    slo=None, finish_reason="eos"))
    await nc.flush()
    await wait_for_events(service, 11)
    sled = service.aggregator.summary()["modes"]["sled"]
    assert (sled["requests"], sled["requests_without_slo"]) == (1, 1)
