"""The wisp client SDK: stream a generation from an edge-drafter (or the server) over NATS.

    async with Client(nats_url) as c:
        gen = c.generate("def fib(n):", max_new_tokens=64, mode="sled", slo=(500, 50))
        async for tok in gen:
            print(tok.text, end="")
        print(gen.done.timings)

    with SyncClient(nats_url) as c:          # from plain synchronous code
        print(c.generate_text("def fib(n):").text)

Mechanics (docs/architecture.md): the client subscribes to a fresh inbox, publishes a
``GenerateRequest`` to ``wisp.edge.generate`` (``wisp.server.generate`` for the server-side
modes ``centralized`` and ``colocated``) with that inbox as reply subject, and reads
``TokenChunk`` messages until ``GenerateDone``.

* **No responder**: the NATS server answers a request nobody subscribes to with a "503 no
  responders" status message; the client raises :class:`ServiceUnavailable` at once.
* **Slow start**: no first message within ``timeout_s`` → :class:`RequestTimeout`.
* **Stall**: once the first chunk has told the session id, a silence of ``stall_timeout_s``
  means the edge-drafter went away (a live one sends an empty chunk every few seconds while a
  round waits, e.g. for a restarting scheduler); the client re-sends the request with
  ``resume_sid`` on a new inbox (up to ``max_resumes`` times). The new stream restarts at output index 0 and the
  client yields only the tokens it has not yielded yet, so every token is seen exactly once.
* Errors: an ``ErrorReply`` or a ``GenerateDone`` with ``error`` raise :class:`ServerError`;
  a session open that admission control refused raises its subclass :class:`Overloaded`,
  whose ``retry_after_ms`` says when capacity is expected to free (the SDK does not retry it:
  waiting or going elsewhere is the caller's call).

An abandoned stream (``break`` out of the loop) keeps its inbox subscription until
``aclose()`` (or ``async with``) or ``Client.close()``; the edge finishes the generation
regardless (the protocol has no cancel message).

This module imports neither torch nor transformers: clients are light.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from common.errors import ErrorCode, WispError, describe
from common.protocol import (
    SERVER_MODES,
    GenerateDone,
    GenerateRequest,
    MalformedReply,
    SamplingParams,
    Slo,
    TokenChunk,
    checked,
    decode_reply,
    encode,
)
from common.subjects import GENERATE_EDGE, SERVER_GENERATE

__all__ = [
    "Client",
    "Generation",
    "GenerationOutput",
    "Overloaded",
    "RequestTimeout",
    "ServerError",
    "ServiceUnavailable",
    "SyncClient",
    "Token",
    "WispClientError",
    "server_error",
    "subject_for_mode",
]

log = structlog.get_logger(__name__)

_NO_RESPONDERS = "503"


# -- errors -----------------------------------------------------------------------------------
# The baseline every edge-drafter serves. Modes "wisp" (rejection predictor) and "ucb" serve
# too; "wisp" becomes the default once its SLO-aware scheduler is in (until then it verifies
# with the scheduler's current batch policy, which would make it a partial WISP by default).
DEFAULT_MODE = "sled"


class WispClientError(Exception):
    """Base of every error the SDK raises."""


class ServiceUnavailable(WispClientError):
    """Nobody serves the subject (no edge-drafter / scheduler running), or NATS is down."""


class RequestTimeout(WispClientError):
    """No answer in time and no way to resume."""


class ServerError(WispClientError):
    """The service answered with an error (``ErrorReply`` or ``GenerateDone.error``).
    ``retry_after_ms``: when the service expects trying again to succeed (None: it did not
    say)."""

    def __init__(self, code: ErrorCode | str, message: str, *,
                 retry_after_ms: float | None = None):
        try:
            code = ErrorCode(code)
        except ValueError:
            message, code = f"{code}: {message}", ErrorCode.INTERNAL
        super().__init__(describe(code, message, retry_after_ms))
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class Overloaded(ServerError):
    """Admission control refused the generation: one more session would push those already
    admitted past their SLOs. Nothing was generated; trying again after ``retry_after_ms``
    (or on another deployment) may succeed."""


def server_error(code: ErrorCode | str, message: str, *,
                 retry_after_ms: float | None = None) -> ServerError:
    """The SDK's exception for an error a service sent: :class:`Overloaded` for
    ``overloaded``, :class:`ServerError` for every other code."""
    cls = Overloaded if code == ErrorCode.OVERLOADED else ServerError
    return cls(code, message, retry_after_ms=retry_after_ms)


# -- results ----------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Token:
    """A piece of the output: ``token_ids`` start at output position ``index``; ``text`` is
    the text they add (may be empty while a multi-byte character is incomplete)."""

    text: str
    token_ids: list[int]
    index: int


@dataclass(slots=True, frozen=True)
class GenerationOutput:
    text: str
    token_ids: list[int]
    done: GenerateDone


def subject_for_mode(mode: str) -> str:
    return SERVER_GENERATE if mode in SERVER_MODES else GENERATE_EDGE


def _to_slo(slo: Slo | tuple[float, float] | None) -> Slo | None:
    if slo is None or isinstance(slo, Slo):
        return slo
    ttft_ms, tpot_ms = slo
    return Slo(ttft_ms=float(ttft_ms), tpot_ms=float(tpot_ms))


# -- output bookkeeping (pure) ----------------------------------------------------------------
class OutputTracker:
    """What the caller has been given so far, and what of a (re)started stream is new.

    Every stream numbers tokens from output index 0 of the session; a resumed stream repeats
    what the caller already has. ``take`` returns the part of a chunk past what was yielded.
    Text cannot be split per token without a tokenizer, so for a chunk that overlaps the
    yielded output only partly the new text is taken from the stream's text accumulated from
    index 0 (the same detokenizer produces the same prefix)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self._stream_next = 0  # index the current stream should send next
        self._stream_text: list[str] = []  # the current stream's text from index 0
        self._stream_aligned = True  # the current stream started at 0 and had no gap

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def new_stream(self) -> None:
        self._stream_next = 0
        self._stream_text = []
        self._stream_aligned = True

    def take(self, chunk: TokenChunk) -> Token | None:
        start, ids = chunk.index, chunk.token_ids
        end = start + len(ids)
        have = self.num_tokens
        if start > have:
            raise ServerError(ErrorCode.INTERNAL,
                              f"token stream skipped output positions {have}..{start - 1}")
        if start != self._stream_next:
            self._stream_aligned = False
        self._stream_next = end
        self._stream_text.append(chunk.text)
        if end <= have:
            return None  # all already yielded (a resumed stream catching up)
        if start == have:
            text = chunk.text
        else:  # partial overlap: only the suffix is new
            stream_text = "".join(self._stream_text)
            emitted = "".join(self.text_parts)
            if self._stream_aligned and stream_text.startswith(emitted):
                text = stream_text[len(emitted):]
            else:
                log.warning("resume_text_misaligned", index=start, have=have)
                text = ""
        new_ids = list(ids[have - start:])
        token = Token(text=text, token_ids=new_ids, index=have)
        self.token_ids.extend(new_ids)
        self.text_parts.append(text)
        return token


# -- async client -----------------------------------------------------------------------------
class Generation:
    """One generation: an async iterator of :class:`Token`. ``sid`` is known after the first
    chunk, ``done`` (timings and stats) after the last; ``text`` and ``token_ids`` hold what
    has been yielded."""

    def __init__(self, client: Client, request: GenerateRequest, *, timeout_s: float,
                 stall_timeout_s: float, max_resumes: int):
        self._client = client
        self._request = request
        self._subject = subject_for_mode(request.mode)
        self._payload = encode_request(request)
        self._timeout_s = timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._max_resumes = max_resumes
        self._output = OutputTracker()
        self._sub: Subscription | None = None
        self._got_message = False  # on the current stream
        self._finished = False
        self.sid: str | None = None
        self.done: GenerateDone | None = None
        self.num_resumes = 0
        self._resume_deadline: float | None = None  # while resumes find no responder
        self._backoff_s = 0.0

    @property
    def text(self) -> str:
        return self._output.text

    @property
    def token_ids(self) -> list[int]:
        return list(self._output.token_ids)

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Token:
        if self._finished:
            raise StopAsyncIteration
        try:
            return await self._next_token()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._finished = True
        await self._unsubscribe()
        self._client._streams.discard(self)

    async def _next_token(self) -> Token:
        if self._sub is None:
            await self._send(self._payload)
        while True:
            msg = await self._next_msg()
            if msg is None:
                continue  # resumed on a new inbox
            reply = self._decode(msg)
            if isinstance(reply, GenerateDone):
                self._finish(reply)
                raise StopAsyncIteration
            self.sid = self.sid or reply.sid
            token = self._output.take(reply)
            if token is not None:
                return token

    def _finish(self, done: GenerateDone) -> None:
        self.done = done
        self.sid = self.sid or done.sid
        self._finished = True
        if done.finish_reason == "error":
            err = done.error
            if err is None:
                raise ServerError(ErrorCode.INTERNAL, "generation failed")
            raise server_error(err.code, err.message, retry_after_ms=err.retry_after_ms)
        if done.num_tokens != self._output.num_tokens:
            log.warning("done_token_count_mismatch", sid=done.sid, done=done.num_tokens,
                        received=self._output.num_tokens)

    async def _send(self, payload: bytes) -> None:
        nc = self._client._require_nc()
        await self._unsubscribe()
        self._sub = await nc.subscribe(nc.new_inbox())
        self._got_message = False
        self._output.new_stream()
        try:
            await nc.publish(self._subject, payload, reply=self._sub.subject)
        except Exception as exc:  # connection closed or draining
            raise ServiceUnavailable(f"cannot publish to {self._subject}: {exc}") from exc

    async def _next_msg(self) -> Msg | None:
        """The next message of the stream, or None after a resume was sent."""
        assert self._sub is not None
        wait_s = self._stall_timeout_s if self._got_message else self._timeout_s
        try:
            msg = await self._sub.next_msg(timeout=wait_s)
        except TimeoutError:
            await self._on_silence(wait_s)
            return None
        except nats.errors.ConnectionClosedError as exc:
            raise ServiceUnavailable(f"NATS connection closed: {exc}") from exc
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
            await self._on_no_responders()
            return None
        self._got_message = True
        self._resume_deadline, self._backoff_s = None, 0.0
        return msg

    async def _on_silence(self, waited_s: float) -> None:
        if self.sid is None:
            raise RequestTimeout(f"no answer on {self._subject} within {waited_s:g} s")
        self._resume_or_raise(RequestTimeout(
            f"session {self.sid}: stream stalled for {waited_s:g} s and "
            f"{self._max_resumes} resumes did not help"), reason="stall", waited_s=waited_s)
        await self._send(self._resume_payload())

    async def _on_no_responders(self) -> None:
        if self.sid is None:
            raise ServiceUnavailable(f"no service is subscribed to {self._subject} "
                                     f"(is the {_service_for(self._subject)} running?)")
        # A resume found nobody: the edge-drafters may be restarting (loading a model takes
        # seconds), so keep asking with backoff until timeout_s has passed since the stall.
        loop = asyncio.get_running_loop()
        if self._resume_deadline is None:
            self._resume_deadline = loop.time() + self._timeout_s
        if loop.time() > self._resume_deadline:
            raise ServiceUnavailable(f"session {self.sid}: no service on {self._subject} to "
                                     f"resume with for {self._timeout_s:g} s")
        self._backoff_s = min(2.0, max(0.25, self._backoff_s * 2))
        log.info("generation_resume_waiting", sid=self.sid, retry_in_s=self._backoff_s)
        await asyncio.sleep(self._backoff_s)
        await self._send(self._resume_payload())

    def _resume_or_raise(self, error: WispClientError, **why: Any) -> None:
        if self.num_resumes >= self._max_resumes:
            raise error
        self.num_resumes += 1
        log.warning("generation_resume", sid=self.sid, attempt=self.num_resumes,
                    max_resumes=self._max_resumes, have_tokens=self._output.num_tokens, **why)

    def _resume_payload(self) -> bytes:
        r = self._request
        resume = GenerateRequest(
            max_new_tokens=r.max_new_tokens, mode=r.mode, slo=r.slo, sampling=r.sampling,
            seed=r.seed, k_max=r.k_max, policy=r.policy, device_profile=r.device_profile,
            resume_sid=self.sid)
        return encode_request(resume)

    @staticmethod
    def _decode(msg: Msg) -> TokenChunk | GenerateDone:
        try:
            return decode_reply((TokenChunk, GenerateDone), msg.data)
        except MalformedReply as exc:
            raise ServerError(ErrorCode.INTERNAL,
                              f"malformed reply from the service: {exc.message}") from None
        except WispError as exc:
            raise server_error(exc.code, exc.message,
                               retry_after_ms=exc.retry_after_ms) from None

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _service_for(subject: str) -> str:
    return "admission-scheduler" if subject == SERVER_GENERATE else "edge-drafter"


def encode_request(request: GenerateRequest) -> bytes:
    """The request's payload, checked as the service will check it (bad arguments fail here,
    as ValueError, not as an error reply)."""
    try:
        return encode(checked(request))
    except WispError as exc:
        raise ValueError(exc.message) from None


class Client:
    """Async SDK client. ``timeout_s``: longest wait for the first message of a stream;
    ``stall_timeout_s``: longest silence after it before resuming; ``max_resumes``: resumes
    per generation. Pass ``nc`` to use an existing NATS connection (it is not closed)."""

    def __init__(self, nats_url: str = "nats://127.0.0.1:4222", *, timeout_s: float = 30.0,
                 stall_timeout_s: float = 15.0, max_resumes: int = 3,
                 connect_timeout_s: float = 5.0, name: str = "wisp-client",
                 nc: NATS | None = None):
        if timeout_s <= 0 or stall_timeout_s <= 0 or max_resumes < 0:
            raise ValueError("timeout_s and stall_timeout_s must be > 0, max_resumes >= 0")
        self.nats_url = nats_url
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_resumes = max_resumes
        self._connect_timeout_s = connect_timeout_s
        self._name = name
        self._nc = nc
        self._owns_nc = nc is None
        self._streams: set[Generation] = set()

    async def connect(self) -> Self:
        if self._nc is None:
            async def on_error(exc: Exception) -> None:
                log.warning("nats_error", error=str(exc))

            try:
                # Reconnect forever once connected, but nats-py applies that to the first
                # connect too: bound it, so a wrong URL fails instead of hanging.
                self._nc = await asyncio.wait_for(nats.connect(
                    self.nats_url, name=self._name, connect_timeout=self._connect_timeout_s,
                    error_cb=on_error, max_reconnect_attempts=-1, reconnect_time_wait=0.5),
                    self._connect_timeout_s)
            except TimeoutError:
                raise ServiceUnavailable(f"cannot connect to NATS at {self.nats_url} within "
                                         f"{self._connect_timeout_s:g} s") from None
            except Exception as exc:
                raise ServiceUnavailable(f"cannot connect to NATS at {self.nats_url}: "
                                         f"{exc}") from exc
        return self

    async def close(self) -> None:
        for gen in list(self._streams):
            await gen.aclose()
        nc, self._nc = self._nc, None
        if nc is not None and self._owns_nc and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _require_nc(self) -> NATS:
        if self._nc is None or self._nc.is_closed:
            raise ServiceUnavailable("client is not connected (use `async with Client(...)` "
                                     "or `await client.connect()`)")
        return self._nc

    def generate(self, prompt: str | None = None, *, max_new_tokens: int = 64,
                 mode: str = DEFAULT_MODE, slo: Slo | tuple[float, float] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, k_max: int | None = None, policy: str | None = None,
                 device_profile: str | None = None, prompt_ids: list[int] | None = None,
                 timeout_s: float | None = None, stall_timeout_s: float | None = None,
                 max_resumes: int | None = None) -> Generation:
        """Start a generation (sent on first iteration). Bad arguments raise ``ValueError``
        here; ``slo`` is a :class:`Slo` or ``(ttft_ms, tpot_ms)``."""
        request = GenerateRequest(
            max_new_tokens=max_new_tokens, mode=mode, prompt=prompt,  # type: ignore[arg-type]
            prompt_ids=list(prompt_ids) if prompt_ids is not None else None, slo=_to_slo(slo),
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
            seed=seed, k_max=k_max, policy=policy, device_profile=device_profile)
        gen = Generation(
            self, request, timeout_s=timeout_s or self.timeout_s,
            stall_timeout_s=stall_timeout_s or self.stall_timeout_s,
            max_resumes=self.max_resumes if max_resumes is None else max_resumes)
        self._streams.add(gen)
        return gen

    async def generate_text(self, prompt: str | None = None, **kw: Any) -> GenerationOutput:
        """The whole output at once."""
        async with self.generate(prompt, **kw) as gen:
            async for _ in gen:
                pass
        assert gen.done is not None
        return GenerationOutput(text=gen.text, token_ids=gen.token_ids, done=gen.done)


# -- sync wrapper -----------------------------------------------------------------------------
class SyncClient:
    """:class:`Client` for synchronous code: runs an event loop in a background thread."""

    def __init__(self, nats_url: str = "nats://127.0.0.1:4222", **client_kw: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wisp-sync-client",
                                        daemon=True)
        self._thread.start()
        self._client = Client(nats_url, **client_kw)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate_text(self, prompt: str | None = None, **kw: Any) -> GenerationOutput:
        return self._call(self._client.generate_text(prompt, **kw))

    def stream(self, prompt: str | None = None, **kw: Any) -> Iterator[Token]:
        """Tokens as they arrive. Bad arguments raise at the call, not at iteration."""
        gen = self._client.generate(prompt, **kw)
        return self._iterate(gen)

    def _iterate(self, gen: Generation) -> Iterator[Token]:
        try:
            while True:
                try:
                    yield self._call(_next_or_end(gen))
                except _StreamEnd:
                    return
        finally:
            if self._loop.is_running():
                self._call(gen.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._loop.is_running():
                self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _StreamEnd(Exception):
    """StopAsyncIteration cannot cross a Future; this does."""


async def _next_or_end(gen: AsyncIterator[Token]) -> Token:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        raise _StreamEnd from None
