"""The metrics service over real NATS, read back through its HTTP routes, and its dashboard
rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import (
    BatchEvent,
    ErrorEvent,
    GenerateStats,
    GenerateTimings,
    RefusalEvent,
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


@contextlib.asynccontextmanager
async def serving(nc: NatsClient, config: MetricsConfig
                  ) -> AsyncIterator[tuple[MetricsService, str]]:
    """The metrics service on `nc`, with its HTTP routes on a free port."""
    service = MetricsService(config)
    service.nc = nc
    await service.start()
    runner, port = await start_http(service, "127.0.0.1", 0)
    try:
        yield service, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await service.stop()


@pytest_asyncio.fixture
async def metrics(nc: NatsClient) -> AsyncIterator[tuple[MetricsService, str]]:
    async with serving(nc, MetricsConfig(http_port=0)) as running:
        yield running


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
    assert 'fetch("/summary"' in page  # the live dashboard (rendered by Chromium below)

    # Still serving after the bad events.
    await publish_event(nc, request("sled", num_tokens=1, ttft_ms=5.0, tpot_ms=0.0, e2e_ms=5.0,
                                    slo=None, finish_reason="eos"))
    await nc.flush()
    await wait_for_events(service, 11)
    sled = service.aggregator.summary()["modes"]["sled"]
    assert (sled["requests"], sled["requests_without_slo"]) == (1, 1)


# -- the dashboard in a real browser ---------------------------------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """$WISP_CHROMIUM (a path or a name on PATH) when set, else the first of CHROMIUM_NAMES on
    PATH; None when there is none."""
    given = os.environ.get("WISP_CHROMIUM")
    names = (given,) if given else CHROMIUM_NAMES
    return next((path for name in names if (path := shutil.which(name))), None)


async def render_dom(url: str, profile: Path, budget_ms: int = 4000) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time (several polls)."""
    chromium = find_chromium()
    assert chromium is not None
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
        "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:  # off the event loop: the metrics service serves the page from this very loop
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Cells(HTMLParser):
    """Text of the dashboard's tagged cells: (mode, metric) of the modes table and (mode,
    code) of the refusals table; plus the status line."""

    def __init__(self, dom: str):
        super().__init__()
        self.modes: dict[tuple[str, str], str] = {}
        self.refusals: dict[tuple[str, str], str] = {}
        self.status = ""
        self._into: tuple[dict, tuple[str, str]] | None = None
        self._in_status = False
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-metric" in a:
            self._into = (self.modes, (a["data-mode"], a["data-metric"]))
            self.modes[self._into[1]] = ""
        elif "data-code" in a:
            self._into = (self.refusals, (a["data-mode"], a["data-code"]))
            self.refusals[self._into[1]] = ""
        self._in_status = a.get("id") == "status"

    def handle_endtag(self, tag: str) -> None:
        self._into, self._in_status = None, False

    def handle_data(self, data: str) -> None:
        if self._into is not None:
            table, key = self._into
            table[key] += data
        if self._in_status:
            self.status += data

    def number(self, mode: str, metric: str) -> float:
        return float(self.modes[(mode, metric)].removesuffix(" %"))


WISP_SLO = Slo(ttft_ms=350.0, tpot_ms=20.0)
LIVE_WINDOW_S = 600.0
TOKENS, E2E_MS = 50, 2000.0


async def publish_wisp(nc: NatsClient, ttfts: list[float], batch_sizes: list[int]) -> None:
    for ttft in ttfts:
        await publish_event(nc, request("wisp", num_tokens=TOKENS, ttft_ms=ttft, tpot_ms=10.0,
                                        e2e_ms=E2E_MS, slo=WISP_SLO))
    for i, size in enumerate(batch_sizes):
        await publish_event(nc, RoundEvent(
            ts_ms=1.0, sid=SID, mode="wisp", round=i, drafted=4, accepted=3 - 2 * (i % 2),
            committed=2, draft_ms=8.0, wasted_draft_ms=1.0, rtt_ms=5.0, budget_ms=50.0,
            batch_size=size))


def assert_live_rate(cells: Cells, metric: str, amount: float, span_s: tuple[float, float]
                     ) -> float:
    """The live rate shown is `amount` over a span within `span_s` (the window opens when the
    first request started, E2E_MS before it arrived, and grows until the page's last poll)."""
    shown = cells.number("wisp", metric)
    low, high = amount / min(LIVE_WINDOW_S, span_s[1]), amount / span_s[0]
    assert low * 0.99 <= shown <= high * 1.01, (metric, shown, low, high)
    return shown


async def test_dashboard_shows_live_numbers_in_a_browser(nc: NatsClient, tmp_path: Path) -> None:
    if find_chromium() is None:
        where = (f"$WISP_CHROMIUM={os.environ['WISP_CHROMIUM']!r} is not an executable"
                 if os.environ.get("WISP_CHROMIUM") else
                 f"none of {', '.join(CHROMIUM_NAMES)} is on PATH and $WISP_CHROMIUM is unset")
        pytest.skip(f"the dashboard test renders the page in headless Chromium, but {where}: "
                    "install it with `apt-get install -y chromium` (`bash tools/bootstrap.sh "
                    "test` does when run as root)")
    # A live window no request leaves during the test, however slow the browser is here.
    async with serving(nc, MetricsConfig(http_port=0, live_window_s=LIVE_WINDOW_S)) as (
            service, base):
        await check_dashboard(service, base, nc, tmp_path)


async def check_dashboard(service: MetricsService, base: str, nc: NatsClient,
                          tmp_path: Path) -> None:
    t0 = time.monotonic()  # the aggregator's clock
    # wisp: TTFT 100..400 ms against a 350 ms SLO -> 3 of 4 met; rounds in batches of 4 and 8
    # accepting 3 and 1. sled: no SLO at all. One refused open.
    await publish_wisp(nc, [100.0, 200.0, 300.0, 400.0], [4, 8])
    for _ in range(2):
        await publish_event(nc, request("sled", num_tokens=10, ttft_ms=50.0, tpot_ms=5.0,
                                        e2e_ms=500.0, slo=None))
    await publish_event(nc, RefusalEvent(ts_ms=1.0, code="prompt_too_long", mode="wisp"))
    await nc.flush()
    await wait_for_events(service, 9)
    first = Cells(await render_dom(f"{base}/", tmp_path / "profile"))
    t1 = time.monotonic()

    assert first.status.startswith("updated"), first.status
    assert first.modes[("wisp", "slo_attainment")] == "75.0 %"
    assert first.number("wisp", "ttft_p50") == 250.0
    assert first.number("wisp", "requests") == 4
    assert first.number("wisp", "acceptance_length") == 2.0  # (3 + 1) / 2 rounds
    assert first.number("wisp", "batch_p50") == 6.0 and first.number("wisp", "batch_mean") == 6
    span = (E2E_MS / 1000, E2E_MS / 1000 + (t1 - t0))
    assert_live_rate(first, "live_tokens_per_s", 4 * TOKENS, span)
    assert_live_rate(first, "live_requests_per_s", 4, span)
    # sled's requests carried no SLO: goodput is unknown, not 0.
    assert first.modes[("sled", "goodput_tokens_per_s")] == "n/a \u2014 no SLO"
    assert first.modes[("sled", "slo_attainment")] == "\u2013"
    assert first.modes[("sled", "goodput_note")] == "no request carried an SLO"
    assert first.refusals == {("wisp", "prompt_too_long"): "1"}

    # More traffic: four wisp requests that miss their SLO, a sled request that meets one, and
    # a centralized refusal. The same page, loaded again, shows the new numbers.
    await publish_wisp(nc, [1000.0] * 4, [16])
    await publish_event(nc, request("sled", num_tokens=10, ttft_ms=50.0, tpot_ms=5.0,
                                    e2e_ms=500.0, slo=WISP_SLO))
    await publish_event(nc, RefusalEvent(ts_ms=1.0, code="overloaded", mode="centralized",
                                         retry_after_ms=500.0))
    await nc.flush()
    await wait_for_events(service, 9 + 7)
    second = Cells(await render_dom(f"{base}/", tmp_path / "profile"))
    t2 = time.monotonic()

    assert second.modes[("wisp", "slo_attainment")] == "37.5 %"  # 3 of 8
    assert second.number("wisp", "ttft_p50") == 700.0  # (400 + 1000) / 2
    assert second.number("wisp", "requests") == 8
    assert second.number("wisp", "acceptance_length") == pytest.approx(7 / 3, abs=0.01)
    assert second.number("wisp", "batch_p50") == 8.0
    assert_live_rate(second, "live_tokens_per_s", 8 * TOKENS,
                     (E2E_MS / 1000, E2E_MS / 1000 + (t2 - t0)))
    assert second.modes[("sled", "slo_attainment")] == "100.0 %"
    assert second.modes[("sled", "goodput_tokens_per_s")] != "n/a \u2014 no SLO"
    assert second.number("sled", "goodput_tokens_per_s") > 0
    assert second.refusals == {("centralized", "overloaded"): "1",
                               ("wisp", "prompt_too_long"): "1"}
    assert second.number("centralized", "refused") == 1
