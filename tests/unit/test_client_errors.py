"""Errors on the way to the SDK user, without NATS: a refused open (`overloaded`, with its
retry_after_ms) from the scheduler's reply through the generation layer to the typed exception
the SDK raises, and the SDK's mapping of every error it decodes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from common import protocol as wire
from common.client import (
    Client,
    Generation,
    Overloaded,
    ServerError,
    WispClientError,
    server_error,
)
from common.errors import RETRYABLE, ErrorCode, WispError
from common.protocol import (
    ErrorInfo,
    GenerateDone,
    GenerateRequest,
    GenerateStats,
    GenerateTimings,
    ModelLimits,
    VocabInfo,
)
from common.subjects import SESSION_OPEN
from common.transport.generation import GenerationServer, nats_request

SID = "a" * 32
REFUSAL = WispError(ErrorCode.OVERLOADED, "predicted 84 ms per round with 17 sessions exceeds "
                    "the tightest budget 60 ms", retry_after_ms=1500.0)


def generation() -> Generation:
    """A generation that never touches NATS (nothing is sent before the first iteration)."""
    return Generation(Client(), GenerateRequest(max_new_tokens=4, prompt="x"), timeout_s=1.0,
                      stall_timeout_s=1.0, max_resumes=0)


def receive(gen: Generation, data: bytes) -> None:
    """What the generation does with one message of its stream."""
    reply = gen._decode(SimpleNamespace(data=data))  # type: ignore[arg-type]
    if isinstance(reply, GenerateDone):
        gen._finish(reply)


def failed_done(error: ErrorInfo) -> bytes:
    return wire.encode(GenerateDone(
        sid=SID, finish_reason="error", num_tokens=0,
        timings=GenerateTimings(ttft_ms=0.0, tpot_ms=0.0, e2e_ms=3.0), stats=GenerateStats(),
        error=error))


# -- the SDK's mapping ---------------------------------------------------------------------------
def test_an_overloaded_done_raises_overloaded_with_its_retry_hint() -> None:
    gen = generation()
    with pytest.raises(Overloaded) as info:
        receive(gen, failed_done(ErrorInfo.of(REFUSAL)))
    err = info.value
    assert isinstance(err, ServerError) and isinstance(err, WispClientError)
    assert err.code is ErrorCode.OVERLOADED and err.retry_after_ms == 1500.0
    assert err.message == REFUSAL.message
    assert "retry after 1500 ms" in str(err)
    assert gen.done is not None and gen.sid == SID  # the done message is still kept


def test_an_overloaded_error_reply_raises_overloaded() -> None:
    # What a refused open sends: an error reply as the stream's only message.
    with pytest.raises(Overloaded) as info:
        receive(generation(), wire.error_reply(REFUSAL))
    assert info.value.retry_after_ms == 1500.0 and info.value.code is ErrorCode.OVERLOADED


@pytest.mark.parametrize("data", [
    failed_done(ErrorInfo(code="capacity", message="no KV room")),
    wire.error_reply(WispError(ErrorCode.PROMPT_TOO_LONG, "too long")),
])
def test_other_errors_stay_plain_server_errors(data: bytes) -> None:
    with pytest.raises(ServerError) as info:
        receive(generation(), data)
    assert not isinstance(info.value, Overloaded)
    assert info.value.retry_after_ms is None and "retry after" not in str(info.value)


def test_server_error_maps_codes() -> None:
    assert type(server_error("overloaded", "full", retry_after_ms=100.0)) is Overloaded
    assert type(server_error(ErrorCode.CAPACITY, "full")) is ServerError
    future = server_error("from_the_future", "m", retry_after_ms=5.0)
    assert type(future) is ServerError and future.code is ErrorCode.INTERNAL
    assert "from_the_future" in future.message and future.retry_after_ms == 5.0


# -- the generation layer: not retried, carried to the client -------------------------------------
class FakeNats:
    """Answers every request with `answer`; records what is published."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.requests: list[str] = []
        self.published: list[tuple[str, bytes]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.requests.append(subject)
        return SimpleNamespace(data=self.answer)

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


def test_overloaded_is_final_for_the_request_it_answers() -> None:
    assert ErrorCode.OVERLOADED not in RETRYABLE and not REFUSAL.retryable


async def test_nats_request_raises_overloaded_at_once() -> None:
    nc = FakeNats(wire.error_reply(REFUSAL))
    with pytest.raises(WispError) as info:
        await nats_request(nc, SESSION_OPEN, wire.SessionClose(sid=SID), wire.SessionOpened,
                           timeout_s=1.0, retries=3, unavailable_timeout_s=1.0)
    assert nc.requests == [SESSION_OPEN]  # one try: not retried
    assert info.value.code is ErrorCode.OVERLOADED and info.value.retry_after_ms == 1500.0


async def test_a_refused_open_reaches_the_clients_stream() -> None:
    nc = FakeNats(wire.error_reply(REFUSAL))
    vocab = VocabInfo(size=1000, digest="0123456789abcdef")
    server = GenerationServer(
        nc=nc, store=None, tokenizer=None, eos_token_id=None,
        limits=ModelLimits(vocab=vocab, k_max=8, max_context=512, max_prompt_tokens=256),
        modes=("centralized",), device_id="server")
    await server.serve(GenerateRequest(max_new_tokens=4, mode="centralized",
                                       prompt_ids=[1, 2, 3]), "_INBOX.client")
    assert nc.requests == [SESSION_OPEN]
    # The refusal to the client, then its event for the metrics: no session opened or closed.
    (subject, data), (event_subject, event_data) = nc.published
    assert subject == "_INBOX.client"
    with pytest.raises(Overloaded) as info:
        receive(generation(), data)
    assert info.value.retry_after_ms == 1500.0 and info.value.message == REFUSAL.message
    assert event_subject == "wisp.events.refusal"
    event = wire.decode(wire.RefusalEvent, event_data)
    assert (event.code, event.mode, event.retry_after_ms) == ("overloaded", "centralized", 1500.0)
