"""The client SDK against fake edge-drafters / schedulers on a real NATS server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from common.client import (
    Client,
    OutputTracker,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    SyncClient,
    Token,
)
from common.errors import ErrorCode, WispError
from common.protocol import (
    ErrorInfo,
    GenerateDone,
    GenerateRequest,
    GenerateStats,
    GenerateTimings,
    TokenChunk,
    decode,
    encode,
    error_reply,
)
from common.subjects import GENERATE_EDGE, SERVER_GENERATE

SID = "a" * 32
OUTPUT = [100, 101, 102, 103, 104, 105]


def text_of(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def chunk(index: int, ids: list[int]) -> bytes:
    return encode(TokenChunk(sid=SID, index=index, token_ids=ids, text=text_of(ids)))


def done(num_tokens: int = len(OUTPUT), error: ErrorInfo | None = None) -> bytes:
    return encode(GenerateDone(
        sid=SID, finish_reason="error" if error else "length", num_tokens=num_tokens,
        timings=GenerateTimings(ttft_ms=12.0, tpot_ms=3.0, e2e_ms=30.0),
        stats=GenerateStats(rounds=2, drafted=8, accepted=5), error=error))


Handler = Callable[[NatsClient, GenerateRequest, str], Awaitable[None]]


async def serve(nc: NatsClient, subject: str, handler: Handler,
                seen: list[GenerateRequest] | None = None) -> None:
    """A fake service: decode each GenerateRequest and let `handler` answer it."""

    async def on_msg(msg: Msg) -> None:
        req = decode(GenerateRequest, msg.data)
        if seen is not None:
            seen.append(req)
        await handler(nc, req, msg.reply)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()


async def stream_all(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
    await nc.publish(reply, chunk(0, OUTPUT[:1]))
    await nc.publish(reply, chunk(1, OUTPUT[1:4]))
    await nc.publish(reply, chunk(4, OUTPUT[4:]))
    await nc.publish(reply, done())


async def test_streams_tokens_in_order_with_done(nc: NatsClient, nats_url: str) -> None:
    seen: list[GenerateRequest] = []
    await serve(nc, GENERATE_EDGE, stream_all, seen)
    async with Client(nats_url, timeout_s=5) as c:
        gen = c.generate("hello", max_new_tokens=6, mode="sled", slo=(200, 20), seed=7,
                         k_max=4)
        tokens = [tok async for tok in gen]
    assert [t.index for t in tokens] == [0, 1, 4]
    assert [i for t in tokens for i in t.token_ids] == OUTPUT
    assert "".join(t.text for t in tokens) == text_of(OUTPUT) == gen.text
    assert gen.sid == SID and gen.done is not None
    assert gen.done.timings.ttft_ms == 12.0 and gen.done.stats.accepted == 5
    (req,) = seen
    assert (req.prompt, req.mode, req.max_new_tokens, req.seed, req.k_max) == \
        ("hello", "sled", 6, 7, 4)
    assert req.slo is not None and (req.slo.ttft_ms, req.slo.tpot_ms) == (200.0, 20.0)
    assert req.resume_sid is None


@pytest.mark.parametrize("mode", ["centralized", "colocated"])
async def test_server_modes_go_to_server_generate(nc: NatsClient, nats_url: str,
                                                  mode: str) -> None:
    seen: list[GenerateRequest] = []
    await serve(nc, SERVER_GENERATE, stream_all, seen)
    async with Client(nats_url, timeout_s=5) as c:
        out = await c.generate_text(prompt_ids=[1, 2, 3], max_new_tokens=6, mode=mode)
    assert out.token_ids == OUTPUT and out.text == text_of(OUTPUT)
    assert out.done.sid == SID
    assert seen[0].mode == mode and seen[0].prompt_ids == [1, 2, 3]


async def test_error_reply_raises_server_error(nc: NatsClient, nats_url: str) -> None:
    async def refuse(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        await nc.publish(reply, error_reply(WispError(ErrorCode.PROMPT_TOO_LONG, "too long")))

    await serve(nc, GENERATE_EDGE, refuse)
    async with Client(nats_url, timeout_s=5) as c:
        with pytest.raises(ServerError) as info:
            await c.generate_text("x" * 10)
    assert info.value.code is ErrorCode.PROMPT_TOO_LONG
    assert info.value.message == "too long"


async def test_done_with_error_raises_after_tokens(nc: NatsClient, nats_url: str) -> None:
    async def fail_midway(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        await nc.publish(reply, chunk(0, OUTPUT[:2]))
        await nc.publish(reply, done(2, ErrorInfo(code=ErrorCode.CAPACITY, message="full")))

    await serve(nc, GENERATE_EDGE, fail_midway)
    async with Client(nats_url, timeout_s=5) as c:
        gen = c.generate("hi")
        got: list[Token] = []
        with pytest.raises(ServerError) as info:
            async for tok in gen:
                got.append(tok)
    assert info.value.code is ErrorCode.CAPACITY
    assert [t.token_ids for t in got] == [OUTPUT[:2]]
    assert gen.done is not None and gen.done.finish_reason == "error"


async def test_malformed_reply_is_an_internal_server_error(nc: NatsClient,
                                                           nats_url: str) -> None:
    async def garble(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        await nc.publish(reply, b"\x81\xa1v\x01")  # {"v": 1}: neither chunk nor done

    await serve(nc, GENERATE_EDGE, garble)
    async with Client(nats_url, timeout_s=5) as c:
        with pytest.raises(ServerError) as info:
            await c.generate_text("hi")
    assert info.value.code is ErrorCode.INTERNAL


async def test_no_responders_is_service_unavailable_at_once(nats_url: str) -> None:
    async with Client(nats_url, timeout_s=10) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="edge-drafter"):
            await c.generate_text("hi")
    assert time.monotonic() - start < 2.0


async def test_silent_service_times_out(nc: NatsClient, nats_url: str) -> None:
    async def ignore(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        return None

    await serve(nc, GENERATE_EDGE, ignore)
    async with Client(nats_url, timeout_s=0.3) as c:
        with pytest.raises(RequestTimeout):
            await c.generate_text("hi")


async def test_resume_after_stall_yields_each_token_once(nc: NatsClient,
                                                         nats_url: str) -> None:
    seen: list[GenerateRequest] = []

    async def dies_then_resumes(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        if req.resume_sid is None:  # the first edge streams 2 chunks and dies
            await nc.publish(reply, chunk(0, OUTPUT[:2]))
            await nc.publish(reply, chunk(2, OUTPUT[2:3]))
            return
        assert req.resume_sid == SID
        # The resumed stream restarts at 0 with other chunk boundaries: [0, 2) is known,
        # [2, 5) overlaps what the client has ([0, 3)) partly.
        await nc.publish(reply, chunk(0, OUTPUT[:2]))
        await nc.publish(reply, chunk(2, OUTPUT[2:5]))
        await nc.publish(reply, chunk(5, OUTPUT[5:]))
        await nc.publish(reply, done())

    await serve(nc, GENERATE_EDGE, dies_then_resumes, seen)
    async with Client(nats_url, timeout_s=5, stall_timeout_s=0.3) as c:
        gen = c.generate("hello", max_new_tokens=6, mode="wisp", temperature=0.5, seed=3)
        tokens = [tok async for tok in gen]
    assert [i for t in tokens for i in t.token_ids] == OUTPUT
    assert [t.index for t in tokens] == [0, 2, 3, 5]
    assert gen.text == text_of(OUTPUT)
    assert gen.num_resumes == 1 and gen.done is not None
    first, resumed = seen
    assert resumed.prompt is None and resumed.resume_sid == SID
    assert (resumed.mode, resumed.max_new_tokens, resumed.sampling.temperature, resumed.seed) == \
        ("wisp", 6, 0.5, 3)


async def test_resumes_are_bounded(nc: NatsClient, nats_url: str) -> None:
    seen: list[GenerateRequest] = []

    async def always_dies(nc: NatsClient, req: GenerateRequest, reply: str) -> None:
        await nc.publish(reply, chunk(0, OUTPUT[:1]))

    await serve(nc, GENERATE_EDGE, always_dies, seen)
    async with Client(nats_url, timeout_s=5, stall_timeout_s=0.2, max_resumes=2) as c:
        gen = c.generate("hello")
        with pytest.raises(RequestTimeout, match="stalled"):
            async for _ in gen:
                pass
    assert len(seen) == 3 and gen.token_ids == OUTPUT[:1]


async def test_sync_client_from_plain_code(nc: NatsClient, nats_url: str) -> None:
    await serve(nc, GENERATE_EDGE, stream_all)

    def plain_sync_code() -> tuple[str, list[list[int]]]:
        with SyncClient(nats_url, timeout_s=5) as c:
            text = c.generate_text("hi").text
            pieces = [tok.token_ids for tok in c.stream("hi", max_new_tokens=6)]
        return text, pieces

    text, pieces = await asyncio.to_thread(plain_sync_code)
    assert text == text_of(OUTPUT)
    assert pieces == [OUTPUT[:1], OUTPUT[1:4], OUTPUT[4:]]


def test_bad_arguments_raise_value_error() -> None:
    c = Client()
    with pytest.raises(ValueError, match="exactly one"):
        c.generate(None)
    with pytest.raises(ValueError, match="temperature"):
        c.generate("x", temperature=-1.0)


def test_tracker_skips_known_and_splits_partial_overlap() -> None:
    t = OutputTracker()
    t.new_stream()
    assert t.take(TokenChunk(sid=SID, index=0, token_ids=[1, 2], text="ab")) == \
        Token(text="ab", token_ids=[1, 2], index=0)
    t.new_stream()  # resumed: starts again at 0
    assert t.take(TokenChunk(sid=SID, index=0, token_ids=[1], text="a")) is None
    assert t.take(TokenChunk(sid=SID, index=1, token_ids=[2, 3, 4], text="bcd")) == \
        Token(text="cd", token_ids=[3, 4], index=2)
    assert t.take(TokenChunk(sid=SID, index=4, token_ids=[5], text="e")) == \
        Token(text="e", token_ids=[5], index=4)
    assert t.text == "abcde" and t.token_ids == [1, 2, 3, 4, 5]
    with pytest.raises(ServerError, match="skipped"):
        t.take(TokenChunk(sid=SID, index=7, token_ids=[8], text="h"))


async def test_unreachable_nats_fails_fast_instead_of_hanging():
    from services.stack.embedded import find_free_port

    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="cannot connect"):
        async with Client(f"nats://127.0.0.1:{find_free_port()}", connect_timeout_s=1.0):
            pass
    assert time.monotonic() - start < 5
