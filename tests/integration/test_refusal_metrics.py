"""Every refusal of a generation reaches the metrics service, counted by mode and code.

Real services on real NATS + Redis: the metrics service, the edge-drafter (the shipped draft
model), the admission-scheduler (with a tiny target tokenizer for the server-side modes) and
the fake verifiers of the scheduler's tests. A client asks for what each service refuses, and
the refusal is read back from the metrics service's /summary and /metrics.

One test per refusal class: the edge's own checks before it opens a session, the verifiers'
limits at open (refused by the scheduler, relayed by the edge), admission control
(`overloaded`), a resume of an unknown session, and the server-side modes' checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client.parser import text_string_to_metric_families

from common.client import Client, Overloaded, ServerError
from common.errors import ErrorCode
from common.models.loading import DEFAULT_DRAFT, LoadedModel, load_model
from common.protocol import GenerateRequest, TokenChunk, decode_reply, encode
from common.subjects import GENERATE_EDGE, SERVER_GENERATE
from common.transport.service import start_http
from services.edge_drafter.service import EdgeConfig, EdgeDrafterService
from services.metrics.service import MetricsConfig, MetricsService
from tests.integration.test_scheduler_service import (
    TIMEOUT_S,
    fake_verifiers,
    limits,
    open_session,
    running,
    running_scheduler,
    save_tiny_target,
    until,
)


@functools.cache
def draft_model() -> LoadedModel:
    return load_model(DEFAULT_DRAFT, "cpu", "float32")


@pytest_asyncio.fixture
async def metrics(nc: NatsClient) -> AsyncIterator[str]:
    """The metrics service on the test's NATS connection; yields its base URL."""
    service = MetricsService(MetricsConfig(http_port=0))
    service.nc = nc
    await service.start()
    runner, port = await start_http(service, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await service.stop()


def running_edge(nats_url: str, redis_url: str) -> contextlib.AbstractAsyncContextManager:
    config = EdgeConfig(nats_url=nats_url, redis_url=redis_url, device="cpu", predictor="",
                        follow_predictor=False, drain_timeout_s=3.0, verify_retries=0)
    return running(EdgeDrafterService(config, model=draft_model()), config, ready_timeout=60,
                   stop_timeout=15)


async def refusals(base: str, total: int) -> dict[tuple[str, str], float]:
    """wisp_refusals_total by (mode, code) once /summary counts `total` refusals; checks
    that /summary and /metrics agree."""
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                async with http.get(f"{base}/summary") as resp:
                    summary = (await resp.json())["refusals"]
                if summary["total"] >= total:
                    break
                await asyncio.sleep(0.02)
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    counted = {(s.labels["mode"], s.labels["code"]): s.value
               for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "wisp_refusals_total"}
    assert counted == {(c["mode"], c["code"]): c["count"] for c in summary["counts"]}
    assert summary["total"] == total, summary
    return counted


async def refused(client: Client, **request: Any) -> ServerError:
    """The error a generation ends with before its first token."""
    gen = client.generate(None, **{"max_new_tokens": 8, "prompt_ids": [5, 6, 7], **request})
    with pytest.raises(ServerError) as info:
        async for _ in gen:
            pass
    return info.value


async def test_the_edges_own_refusals_are_counted(metrics: str, nats_url: str, redis_url: str,
                                                  nc: NatsClient) -> None:
    model = draft_model()
    too_long = [5] * (model.max_positions // 2 + 1)
    async with running_edge(nats_url, redis_url), Client(nats_url, timeout_s=30) as client:
        # No scheduler, no verifier: each is refused at the edge, before any session opens.
        cases = [({"mode": "wisp", "prompt_ids": too_long}, ErrorCode.PROMPT_TOO_LONG),
                 ({"mode": "sled", "prompt_ids": [model.vocab_size + 3]},
                  ErrorCode.OUT_OF_VOCABULARY),
                 ({"mode": "sled", "device_profile": "no-such-device"}, ErrorCode.BAD_REQUEST),
                 ({"mode": "ucb", "policy": "no-such-policy"}, ErrorCode.BAD_REQUEST),
                 ({"mode": "ucb", "k_max": 64}, ErrorCode.DRAFT_TOO_LONG)]
        for request, code in cases:
            assert (await refused(client, **request)).code == code, request
        # A server-side mode sent to the edge (as a raw request: the SDK would route it).
        reply = await nc.request(GENERATE_EDGE, encode(GenerateRequest(
            max_new_tokens=4, mode="centralized", prompt_ids=[5])), timeout=TIMEOUT_S)
        with pytest.raises(Exception) as info:
            decode_reply(TokenChunk, reply.data)
        assert info.value.code == ErrorCode.BAD_REQUEST
        # A request that does not decode: refused, its mode unknown.
        reply = await nc.request(GENERATE_EDGE, b"\xc1 not msgpack", timeout=TIMEOUT_S)
        with pytest.raises(Exception) as info:
            decode_reply(TokenChunk, reply.data)
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert await refusals(metrics, 7) == {
            ("wisp", "prompt_too_long"): 1, ("sled", "out_of_vocabulary"): 1,
            ("sled", "bad_request"): 1, ("ucb", "bad_request"): 1, ("ucb", "draft_too_long"): 1,
            ("centralized", "bad_request"): 1, ("unknown", "bad_request"): 1}


async def test_the_verifiers_limits_at_open_are_counted(metrics: str, nats_url: str,
                                                        redis_url: str, nc: NatsClient) -> None:
    vocab = draft_model().vocab_info
    async with (running_scheduler(nats_url, redis_url) as scheduler,
                fake_verifiers(nc, scheduler, ("v1", 10, False,
                                               limits(vocab=vocab, max_context=64))),
                running_edge(nats_url, redis_url),
                Client(nats_url, timeout_s=30) as client):
        # Fits the edge's draft model; not the verifier's context of 64 tokens: refused by the
        # scheduler at open, told to the client by the edge, counted once, with its mode.
        err = await refused(client, mode="wisp", max_new_tokens=100)
        assert err.code == ErrorCode.SEQUENCE_TOO_LONG and "context of verifier" in err.message
        assert await refusals(metrics, 1) == {("wisp", "sequence_too_long"): 1}


async def test_admission_refusals_are_counted(metrics: str, nats_url: str, redis_url: str,
                                              nc: NatsClient) -> None:
    vocab = draft_model().vocab_info
    async with (running_scheduler(nats_url, redis_url, max_sessions_per_verifier=1) as scheduler,
                fake_verifiers(nc, scheduler, ("v1", 10, False, limits(vocab=vocab))),
                running_edge(nats_url, redis_url),
                Client(nats_url, timeout_s=30) as client):
        await open_session(nc, vocab=vocab)  # the verifier's one session
        err = await refused(client, mode="sled", slo=(1000.0, 100.0))
        assert isinstance(err, Overloaded)
        assert await refusals(metrics, 1) == {("sled", "overloaded"): 1}
        # The scheduler's own views of the same open are counted apart, not as refusals.
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(TIMEOUT_S):
                while True:
                    async with http.get(f"{metrics}/summary") as resp:
                        summary = await resp.json()
                    if summary["admission"]["refused"] and summary["errors"]:
                        break
                    await asyncio.sleep(0.02)
        assert summary["admission"]["refused"] == 1
        assert {"service": "admission-scheduler", "code": "overloaded", "count": 1} in \
            summary["errors"]
        assert summary["modes"]["sled"]["refused"] == 1


async def test_a_resume_of_an_unknown_session_is_counted(metrics: str, nats_url: str,
                                                         redis_url: str, nc: NatsClient) -> None:
    async with running_edge(nats_url, redis_url):
        reply = await nc.request(GENERATE_EDGE, encode(GenerateRequest(
            max_new_tokens=4, resume_sid="ab" * 16)), timeout=TIMEOUT_S)
        with pytest.raises(Exception) as info:
            decode_reply(TokenChunk, reply.data)
        assert info.value.code == ErrorCode.UNKNOWN_SESSION
        # The mode is the stored session's, unknown when there is none.
        assert await refusals(metrics, 1) == {("unknown", "unknown_session"): 1}


async def test_server_side_refusals_are_counted(metrics: str, nats_url: str, redis_url: str,
                                                nc: NatsClient, tmp_path: Path) -> None:
    vocab = save_tiny_target(tmp_path)
    async with (running_scheduler(nats_url, redis_url, target_model=str(tmp_path),
                                  max_prompt_tokens=4) as scheduler,
                fake_verifiers(nc, scheduler, ("v1", 10, False,
                                               limits(vocab=vocab, max_context=32))),
                Client(nats_url, timeout_s=30) as client):
        await until(lambda: scheduler._server is not None)  # the tokenizer loads in a thread
        err = await refused(client, mode="centralized", prompt_ids=[3, 4, 5, 6, 7])
        assert err.code == ErrorCode.PROMPT_TOO_LONG  # the scheduler's own prompt limit
        err = await refused(client, mode="centralized", max_new_tokens=40)
        assert err.code == ErrorCode.SEQUENCE_TOO_LONG  # the verifier's context
        # Refused by the scheduler's checks before serving: a payload that does not decode.
        reply = await nc.request(SERVER_GENERATE, b"\xc1", timeout=TIMEOUT_S)
        with pytest.raises(Exception) as info:
            decode_reply(TokenChunk, reply.data)
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert await refusals(metrics, 3) == {("centralized", "prompt_too_long"): 1,
                                              ("centralized", "sequence_too_long"): 1,
                                              ("unknown", "bad_request"): 1}
