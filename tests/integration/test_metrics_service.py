"""The metrics service over real NATS, read back through its HTTP routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import Event, encode
from common.service import start_http
from common.subjects import event as event_subject
from services.metrics.service import MetricsConfig, MetricsService


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


async def publish(nc: NatsClient, kind: str, **fields: object) -> None:
    await nc.publish(event_subject(kind), encode(Event(kind=kind, ts_ms=1.0, fields=fields)))


async def wait_for_events(service: MetricsService, n: int) -> None:
    for _ in range(200):
        s = service.aggregator.summary()["events"]
        if sum(s["received"].values()) + s["malformed"].get("undecodable", 0) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the service did not see {n} events: {s}")


def prom_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_events_reach_metrics_and_summary(metrics: tuple[MetricsService, str],
                                                nc: NatsClient) -> None:
    service, base = metrics
    await nc.publish(event_subject("request"), b"\xc1 not msgpack")  # must not stop it
    await publish(nc, "request", mode="wisp", num_tokens=12, ttft_ms=80.0, tpot_ms=10.0,
                  e2e_ms=190.0, slo_ttft_ms=100.0, slo_tpot_ms=20.0, finish_reason="length")
    await publish(nc, "request", mode="wisp", num_tokens=12, ttft_ms=180.0, tpot_ms=10.0,
                  e2e_ms=290.0, slo_ttft_ms=100.0, slo_tpot_ms=20.0, finish_reason="length")
    await publish(nc, "request", mode="wisp", num_tokens="many", e2e_ms=1.0)  # malformed
    await publish(nc, "round", mode="wisp", round=0, drafted=5, accepted=3, draft_ms=20.0,
                  wasted_draft_ms=8.0, rtt_ms=5.0, budget_ms=60.0)
    await publish(nc, "batch", verifier_id="v0", size=3, batch_ms=12.0, num_linear=9,
                  num_interactions=300, num_cached=90, queue_depth=4)
    await publish(nc, "error", service="edge-drafter", code="capacity")
    await nc.flush()
    await wait_for_events(service, 7)

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

    assert samples[("wisp_requests_total", (("mode", "wisp"), ("slo", "met")))] == 1
    assert samples[("wisp_requests_total", (("mode", "wisp"), ("slo", "missed")))] == 1
    assert samples[("wisp_output_tokens_total", (("mode", "wisp"),))] == 24
    assert samples[("wisp_ttft_seconds_count", (("mode", "wisp"),))] == 2
    assert samples[("wisp_accepted_tokens_total", (("mode", "wisp"),))] == 3
    assert samples[("wisp_queue_depth", (("verifier_id", "v0"),))] == 4
    assert samples[("wisp_errors_total", (("code", "capacity"), ("service", "edge-drafter")))] == 1
    assert samples[("wisp_metrics_malformed_events_total", (("kind", "request"),))] == 1
    assert samples[("wisp_metrics_malformed_events_total", (("kind", "undecodable"),))] == 1

    wisp = summary["modes"]["wisp"]
    assert (wisp["requests"], wisp["slo_met"], wisp["slo_attainment"]) == (2, 1, 0.5)
    assert wisp["mean_acceptance_length"] == 3.0 and wisp["wasted_draft_s"] == 0.008
    assert summary["batches"]["count"] == 1 and summary["batches"]["queue_depth"] == {"v0": 4}
    assert summary["events"]["malformed"] == {"request": 1, "undecodable": 1}
    assert "<td>wisp</td>" in page

    # Still serving after the bad events.
    await publish(nc, "request", mode="sled", num_tokens=1, ttft_ms=5.0, e2e_ms=5.0,
                  finish_reason="eos")
    await nc.flush()
    await wait_for_events(service, 8)
    assert service.aggregator.summary()["modes"]["sled"]["requests_without_slo"] == 1
