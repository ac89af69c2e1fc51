"""The client-facing side of a generation over NATS, shared by the edge-drafter (edge modes)
and the admission-scheduler (server-side modes `centralized` and `colocated`).

`GenerationServer.serve` opens a session (`wisp.session.open`) or resumes one from Redis, runs
the one round loop (`common.engine.session.SessionCore`) with a NATS verify port, streams
`TokenChunk`s to the client's inbox after each round, and ends with `GenerateDone`, a request
event and `wisp.session.close`. The verifier commits to Redis before replying, so nothing a
client sees is ever lost; a new edge can resume a session from Redis alone. An open that fails
(a bad request, or `overloaded`: admission control refused it) ends the stream with that
error reply, `retry_after_ms` included, and a refusal event (whoever refused it: this process
or the scheduler); only CAPACITY and UNAVAILABLE are retried here.

Transport only: retries and waiting out a restarting scheduler live in `NatsVerifyPort`, link
emulation is a hook (`Link`) the edge-drafter supplies, and everything about a round is the
session core's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
import structlog

from common import protocol as wire
from common.engine.draft_batcher import DraftBatcher
from common.engine.policies import PolicyCatalog
from common.engine.session import DraftPort, EdgeSession, SessionCore
from common.errors import ErrorCode, WispError
from common.limits import check_prompt
from common.protocol import ModelLimits, SessionSpec
from common.store import SessionStore
from common.subjects import SESSION_CLOSE, SESSION_OPEN, VERIFY_SUBMIT
from common.transport.service import publish_event, publish_refusal

__all__ = ["Detokenizer", "GenerationServer", "Link", "NatsVerifyPort", "nats_request"]

log = structlog.get_logger(__name__)


class Link(Protocol):
    """Delays of an emulated network link (the edge-drafter's device profiles)."""

    @property
    def uplink_ms(self) -> float: ...

    def uplink_delay_s(self, num_bytes: int) -> float: ...

    def downlink_delay_s(self, num_bytes: int) -> float: ...


async def nats_request(nc: Any, subject: str, msg: Any, reply_cls: Any, *, timeout_s: float,
                       retries: int, unavailable_timeout_s: float,
                       link: Link | None = None) -> Any:
    """NATS request, retried with the same payload (rounds are idempotent per (sid, round)).

    A timeout or a retryable error (CAPACITY, UNAVAILABLE) uses one of `retries`; "no
    responders" (the scheduler is restarting) is waited out with backoff for up to
    `unavailable_timeout_s`. Any other error reply is raised as its `WispError`.
    """
    payload = wire.encode(msg)
    loop = asyncio.get_running_loop()
    unavailable_until = None
    attempts, backoff_s, last = 0, 0.0, ""
    while True:
        try:
            if link:
                await asyncio.sleep(link.uplink_delay_s(len(payload)))
            reply = await nc.request(subject, payload, timeout=timeout_s)
            if link:
                await asyncio.sleep(link.downlink_delay_s(len(reply.data)))
            return wire.decode_reply(reply_cls, reply.data)
        except nats.errors.NoRespondersError:
            unavailable_until = unavailable_until or loop.time() + unavailable_timeout_s
            if loop.time() > unavailable_until:
                raise WispError(ErrorCode.UNAVAILABLE,
                                f"{subject}: no service answered for "
                                f"{unavailable_timeout_s:g} s") from None
            backoff_s = min(2.0, max(0.1, backoff_s * 2))
            log.info("request_waiting_for_responder", subject=subject, retry_in_s=backoff_s)
            await asyncio.sleep(backoff_s)
            continue
        except nats.errors.TimeoutError:
            last = "timeout"
        except WispError as err:
            if not err.retryable:
                raise
            last = f"{err.code}: {err.message}"
        unavailable_until = None
        attempts += 1
        if attempts > retries:
            raise WispError(ErrorCode.UNAVAILABLE,
                            f"{subject}: no answer after {attempts} tries ({last})")
        log.warning("request_retry", subject=subject, attempt=attempts, reason=last)
        await asyncio.sleep(min(2.0, 0.2 * attempts))


class NatsVerifyPort:
    """VerifyPort: rounds go to `wisp.verify.submit` (the scheduler's queue group)."""

    def __init__(self, nc: Any, *, timeout_s: float, retries: int,
                 unavailable_timeout_s: float, link: Link | None = None):
        self.nc, self.link = nc, link
        self.timeout_s, self.retries = timeout_s, retries
        self.unavailable_timeout_s = unavailable_timeout_s

    @property
    def uplink_ms(self) -> float:
        return self.link.uplink_ms if self.link else 0.0

    async def submit(self, request: wire.VerifyRequest) -> wire.VerifyResult:
        return await nats_request(self.nc, VERIFY_SUBMIT, request, wire.VerifyResult,
                                  timeout_s=self.timeout_s, retries=self.retries,
                                  unavailable_timeout_s=self.unavailable_timeout_s,
                                  link=self.link)


class Detokenizer:
    """Text for a growing list of ids; holds back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.emitted = ""

    def push(self, ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
        if not final and text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return new


# (profile name or None, sid, verify port, draft port or None) -> the ports to use
Emulation = Callable[[str | None, str, NatsVerifyPort, DraftPort | None],
                     tuple[NatsVerifyPort, DraftPort | None]]


@dataclass(slots=True, kw_only=True)
class GenerationServer:
    """Serves `GenerateRequest`s for the modes in `modes`. `drafter` None: no mode drafts;
    `policies` gives each drafting session its draft-length policy. `limits` are this
    process's own model's (the edge's draft model, the server's tokenizer): prompts are checked
    against them before a session opens; a verifier's are checked by the scheduler at open."""

    nc: Any
    store: SessionStore
    tokenizer: Any
    eos_token_id: int | None
    limits: ModelLimits
    modes: tuple[str, ...]
    device_id: str
    drafter: DraftBatcher | None = None
    policies: PolicyCatalog | None = None
    default_k_max: int = 8
    verify_timeout_s: float = 10.0
    verify_retries: int = 3
    unavailable_timeout_s: float = 30.0  # wait this long for a restarting scheduler
    # A session open may wait at the scheduler for admission (its admission_wait_s) before it
    # is admitted or refused as overloaded: a shorter timeout would re-send the open and lose
    # the refusal (and its retry_after_ms) on the way to the client.
    open_timeout_s: float = 30.0
    max_prompt_bytes: int = wire.MAX_PROMPT_BYTES
    emulation: Emulation | None = None  # device emulation (the edge-drafter's profiles)
    # While a round waits (for a busy or restarting scheduler), an empty chunk this often tells
    # the client the stream is alive, so it resumes elsewhere only when this process is gone.
    keepalive_s: float = 5.0
    elsewhere: Mapping[str, str] = field(default_factory=dict)  # mode -> subject serving it

    async def serve(self, request: wire.GenerateRequest, reply_to: str) -> None:
        # Drawn here rather than at open so that a refusal names the session it would have been
        # (the scheduler's admission event for the same open carries it too).
        sid = request.resume_sid or wire.new_sid()
        try:
            if request.resume_sid:
                session, core = await self._resume(request)
            else:
                session, core = await self._open(request, sid)
        except WispError as err:
            log.warning("generate_rejected", code=str(err.code), reason=err.message)
            await self._publish(reply_to, wire.error_reply(err))
            # A resume's mode is the stored session's, unknown when it could not be loaded.
            await publish_refusal(self.nc, err, sid=sid,
                                  mode=None if request.resume_sid else request.mode)
            return
        with structlog.contextvars.bound_contextvars(sid=session.sid):
            await self._stream(session, core, reply_to)

    # -- streaming ------------------------------------------------------------------------------
    async def _stream(self, s: EdgeSession, core: SessionCore, reply_to: str) -> None:
        detok = Detokenizer(self.tokenizer)
        loop = asyncio.get_running_loop()
        sent, last_sent_at = 0, loop.time()
        sending = asyncio.Lock()  # the keepalive and the rounds send in turn, in index order
        error: WispError | None = None

        async def send_new(session: EdgeSession) -> None:
            nonlocal sent, last_sent_at
            async with sending:
                out = session.output
                text = detok.push(out, final=session.finished)
                await self._publish(reply_to, wire.encode(wire.TokenChunk(
                    sid=session.sid, index=sent, token_ids=out[sent:], text=text)))
                sent, last_sent_at = len(out), loop.time()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(max(0.0, last_sent_at + self.keepalive_s - loop.time()))
                if loop.time() - last_sent_at >= self.keepalive_s:
                    await send_new(s)  # nothing new: an empty chunk at the current index

        async def on_round(event: wire.RoundEvent) -> None:
            await publish_event(self.nc, event)

        try:
            # First message: the session id, before any token, so that the client can resume
            # the session elsewhere should this process die from here on. A resumed session's
            # stream restarts at output index 0 with everything committed so far.
            await send_new(s)
            alive = asyncio.create_task(keepalive(), name=f"keepalive-{s.sid}")
            try:
                await core.run(s, on_tokens=send_new, on_round=on_round)
            finally:
                alive.cancel()
        except WispError as err:
            log.warning("generation_failed", code=str(err.code), reason=err.message)
            error = err
        except Exception as exc:  # noqa: BLE001 - the client must hear about it
            log.exception("generation_crashed")
            error = WispError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        done = core.done(s, error)
        await self._publish(reply_to, wire.encode(done))
        await publish_event(self.nc, core.request_event(s, done))
        if s.drafting:
            await self.drafter.close(s.sid)
        await self._publish(SESSION_CLOSE, wire.encode(wire.SessionClose(sid=s.sid)))

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - a closed connection must not crash a stream
            log.error("publish_failed", subject=subject, error=str(exc))

    # -- opening --------------------------------------------------------------------------------
    def _core(self, req: wire.GenerateRequest, sid: str, drafting: bool) -> SessionCore:
        verifier = NatsVerifyPort(self.nc, timeout_s=self.verify_timeout_s,
                                  retries=self.verify_retries,
                                  unavailable_timeout_s=self.unavailable_timeout_s)
        drafter: DraftPort | None = self.drafter if drafting else None
        if self.emulation is not None:
            verifier, drafter = self.emulation(req.device_profile, sid, verifier, drafter)
        return SessionCore(verifier, drafter, self.eos_token_id)

    def _check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            hint = (f"; mode {mode!r} is served on {self.elsewhere[mode]}"
                    if mode in self.elsewhere else
                    f"; mode {mode!r} is not available in this build")
            raise WispError(ErrorCode.BAD_REQUEST,
                            f"this service serves modes {list(self.modes)}{hint}")

    def _drafts(self, mode: str) -> bool:
        return self.drafter is not None and mode != "centralized"

    async def _open(self, req: wire.GenerateRequest,
                    sid: str) -> tuple[EdgeSession, SessionCore]:
        # TTFT counts from the request's arrival: opening the session (admission, the
        # drafter's prefill of the prompt) is part of the wait for the first token.
        received = time.monotonic()  # SessionCore's clock
        self._check_mode(req.mode)
        drafting = self._drafts(req.mode)
        k_max = req.k_max or self.default_k_max
        if drafting and k_max > self.drafter.core.k_max:
            raise WispError(ErrorCode.DRAFT_TOO_LONG,
                            f"k_max {k_max} exceeds this drafter's {self.drafter.core.k_max}")
        policy = self.policies.for_session(req.mode, req.policy) if drafting else None
        prompt_ids = await self._prompt_ids(req)
        check_prompt(prompt_ids, self.limits)
        spec = SessionSpec(sid=sid, mode=req.mode, max_new_tokens=req.max_new_tokens,
                           sampling=req.sampling, seed=req.seed, k_max=k_max, slo=req.slo,
                           device_id=self.device_id)
        core = self._core(req, spec.sid, drafting)  # a bad device profile fails before opening
        opened = await nats_request(
            self.nc, SESSION_OPEN, wire.SessionOpen(spec=spec, prompt_ids=prompt_ids,
                                                    vocab=self.limits.vocab),
            wire.SessionOpened, timeout_s=self.open_timeout_s, retries=self.verify_retries,
            unavailable_timeout_s=self.unavailable_timeout_s)
        if drafting:
            await self.drafter.open(spec, prompt_ids, policy)
        log.info("session_opened", sid=spec.sid, verifier=opened.verifier_id, mode=req.mode,
                 prompt_tokens=len(prompt_ids))
        return core.session(spec, prompt_ids, started_s=received), core

    async def _prompt_ids(self, req: wire.GenerateRequest) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        size = len(req.prompt.encode())
        if size > self.max_prompt_bytes:
            raise WispError(ErrorCode.PROMPT_TOO_LONG,
                            f"prompt is {size} bytes; no prompt over {self.max_prompt_bytes} "
                            f"bytes fits in {self.limits.max_prompt_tokens} tokens")
        # Tokenizing is CPU work proportional to the prompt: keep it off the event loop.
        return await asyncio.to_thread(self.tokenizer.encode, req.prompt,
                                       add_special_tokens=False)

    async def _resume(self, req: wire.GenerateRequest) -> tuple[EdgeSession, SessionCore]:
        try:
            record = await self.store.load(req.resume_sid)
        except ValueError as exc:
            raise WispError(ErrorCode.UNKNOWN_SESSION,
                            f"session {req.resume_sid} cannot be resumed: {exc}") from None
        if record is None or record.state == "closed":
            raise WispError(ErrorCode.UNKNOWN_SESSION,
                            f"session {req.resume_sid} cannot be resumed (unknown or closed)")
        spec = record.spec
        self._check_mode(spec.mode)
        drafting = self._drafts(spec.mode) and record.state != "finished"
        core = self._core(req, spec.sid, drafting)
        if drafting:
            policy = self.policies.for_session(spec.mode, req.policy)
            await self.drafter.open(spec, record.prompt_ids, policy, record.output_ids)
        log.info("session_resumed", sid=spec.sid, committed=len(record.tokens),
                 next_round=record.last_round + 1)
        return core.session(spec, record.prompt_ids, record.output_ids,
                            next_round=record.last_round + 1), core

