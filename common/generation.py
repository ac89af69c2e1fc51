"""The client-facing generation loop: open (or resume) a session, run rounds, stream tokens.

The edge-drafter runs it for edge modes, the admission-scheduler for server-side modes
(`centralized`: no drafter, k = 0 every round; `colocated`: the server's own drafter). Each
round: draft (batched with the process's other sessions) → `VerifyRequest` to the scheduler,
retried as the same `(sid, round)` on timeout → apply the verdict → `TokenChunk` to the
client → next round. The verifier commits to Redis before replying, so nothing a client sees
is ever lost; a new edge can resume a session from Redis alone (docs/services.md).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import nats.errors
import structlog

from common import protocol as wire
from common.device_profile import DeviceProfile, LinkEmulator, get_profile
from common.draft_batcher import DraftBatcher
from common.errors import ErrorCode, WispError
from common.sampling import SamplingParams
from common.store import SessionStore
from common.subjects import SESSION_CLOSE, SESSION_OPEN, VERIFY_SUBMIT, event

log = structlog.get_logger(__name__)

EDGE_MODES = ("sled",)  # wisp and ucb arrive with the predictor and UCB-SpecStop policies
SERVER_MODES = ("centralized", "colocated")
NO_SLO_BUDGET_MS = 600_000.0  # a session without an SLO is in no hurry


@dataclass(slots=True)
class GenerationContext:
    nc: object  # nats.aio.client.Client
    store: SessionStore
    tokenizer: object
    drafter: DraftBatcher | None  # None: target-only rounds (k = 0)
    device_id: str
    eos_token_id: int | None
    default_k_max: int = 8
    verify_timeout_s: float = 10.0
    verify_retries: int = 3
    unavailable_timeout_s: float = 30.0  # wait this long for a restarting scheduler
    profile: DeviceProfile | None = None  # the process's default device profile
    modes: tuple[str, ...] = EDGE_MODES  # modes this process serves
    vocab_size: int | None = None  # refuse prompt ids outside it before opening a session
    max_prompt_tokens: int | None = None


@dataclass(slots=True)
class _Live:
    sid: str
    mode: str
    prompt_len: int
    committed: list[int]
    max_new_tokens: int
    k_max: int
    slo: wire.Slo | None
    next_round: int
    drafting: bool
    link: LinkEmulator | None
    stats: wire.GenerateStats = field(
        default_factory=lambda: wire.GenerateStats(rounds=0, drafted=0, accepted=0))

    @property
    def output(self) -> list[int]:
        return self.committed[self.prompt_len :]


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


async def run_generation(ctx: GenerationContext, request: wire.GenerateRequest,
                         reply_to: str) -> None:
    start = time.monotonic()
    try:
        live = await _open_or_resume(ctx, request)
    except WispError as err:
        log.warning("generate_rejected", code=str(err.code), reason=err.message)
        await ctx.nc.publish(reply_to, wire.error_reply(err))
        return
    with structlog.contextvars.bound_contextvars(sid=live.sid):
        await _serve(ctx, live, reply_to, start)


async def _serve(ctx: GenerationContext, live: _Live, reply_to: str, start: float) -> None:
    detok = Detokenizer(ctx.tokenizer)
    first_token_at: float | None = None
    sent = 0
    error: wire.ErrorInfo | None = None
    finished = False
    try:
        # First message: the session id, before any token, so that the client can resume the
        # session elsewhere should this process die from here on. A resumed session's stream
        # restarts at output index 0 with everything committed so far.
        sent = await _send_chunk(ctx, reply_to, live, detok, 0)
        if live.output:
            first_token_at = time.monotonic()
        finished = _is_finished(ctx, live)
        while not finished:
            result = await _round(ctx, live, start)
            finished = result.finished
            if result.new_tokens:
                sent = await _send_chunk(ctx, reply_to, live, detok, sent)
                if first_token_at is None:
                    first_token_at = time.monotonic()
    except WispError as err:
        log.warning("generation_failed", code=str(err.code), reason=err.message)
        error = wire.ErrorInfo(code=err.code, message=err.message)
    except Exception as exc:  # noqa: BLE001 - the client must hear about it
        log.exception("generation_crashed")
        error = wire.ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}")
    end = time.monotonic()
    done = _done_message(live, start, first_token_at, end, error)
    await ctx.nc.publish(reply_to, wire.encode(done))
    await _publish_request_event(ctx, live, done)
    await _close(ctx, live)


def _is_finished(ctx: GenerationContext, live: _Live) -> bool:
    out = live.output
    return len(out) >= live.max_new_tokens or (
        bool(out) and ctx.eos_token_id is not None and out[-1] == ctx.eos_token_id)


async def _send_chunk(ctx, reply_to: str, live: _Live, detok: Detokenizer, sent: int) -> int:
    out = live.output
    finished = _is_finished(ctx, live)
    text = detok.push(out, final=finished)
    chunk = wire.TokenChunk(sid=live.sid, index=sent, token_ids=out[sent:], text=text)
    await ctx.nc.publish(reply_to, wire.encode(chunk))
    return len(out)


# -- opening ---------------------------------------------------------------------------------
async def _open_or_resume(ctx: GenerationContext, req: wire.GenerateRequest) -> _Live:
    if req.mode not in ctx.modes:
        where = ("wisp.server.generate" if req.mode in SERVER_MODES else
                 "wisp.edge.generate" if req.mode in EDGE_MODES else None)
        hint = (f"; mode {req.mode!r} is served on {where}" if where else
                f"; mode {req.mode!r} is not available in this build")
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"this service serves modes {list(ctx.modes)}{hint}")
    try:
        profile = get_profile(req.device_profile) if req.device_profile else ctx.profile
    except ValueError as exc:
        raise WispError(ErrorCode.BAD_REQUEST, str(exc)) from None
    drafting = ctx.drafter is not None and req.mode != "centralized"
    if req.resume_sid:
        return await _resume(ctx, req, profile, drafting)
    k_max = req.k_max or ctx.default_k_max
    if drafting and k_max > ctx.drafter.core.k_max:
        raise WispError(ErrorCode.DRAFT_TOO_LONG,
                        f"k_max {k_max} exceeds this drafter's {ctx.drafter.core.k_max}")
    prompt_ids = req.prompt_ids if req.prompt_ids is not None else \
        ctx.tokenizer.encode(req.prompt, add_special_tokens=False)
    _check_prompt(ctx, prompt_ids)
    sampling = wire.Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    sid = wire.new_sid()
    opened = await _request(ctx, SESSION_OPEN, wire.SessionOpen(
        sid=sid, mode=req.mode, prompt_ids=list(prompt_ids), max_new_tokens=req.max_new_tokens,
        device_id=ctx.device_id, k_max=k_max, sampling=sampling, seed=req.seed, slo=req.slo),
        wire.SessionOpened)
    live = _Live(sid, req.mode, len(prompt_ids), list(prompt_ids), req.max_new_tokens, k_max,
                 req.slo, 0, drafting, _link(profile, sid))
    if drafting:
        await _open_drafter(ctx, live, sampling.to_params(), req.seed, req.policy)
    log.info("session_opened", sid=sid, verifier=opened.verifier_id, mode=req.mode,
             prompt_tokens=len(prompt_ids))
    return live


def _check_prompt(ctx: GenerationContext, prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise WispError(ErrorCode.BAD_REQUEST, "the prompt encodes to no tokens")
    if ctx.max_prompt_tokens and len(prompt_ids) > ctx.max_prompt_tokens:
        raise WispError(ErrorCode.PROMPT_TOO_LONG,
                        f"prompt has {len(prompt_ids)} tokens; the limit is "
                        f"{ctx.max_prompt_tokens}")
    if ctx.vocab_size is not None:
        bad = [t for t in prompt_ids if t >= ctx.vocab_size]
        if bad:
            raise WispError(ErrorCode.OUT_OF_VOCABULARY,
                            f"prompt holds {len(bad)} token ids outside [0, {ctx.vocab_size}), "
                            f"e.g. {bad[0]}")


async def _resume(ctx, req: wire.GenerateRequest, profile, drafting: bool) -> _Live:
    record = await ctx.store.load(req.resume_sid)
    if record is None or record.state == "closed":
        raise WispError(ErrorCode.UNKNOWN_SESSION,
                        f"session {req.resume_sid} cannot be resumed (unknown or closed)")
    slo = (wire.Slo(ttft_ms=record.slo_ttft_ms, tpot_ms=record.slo_tpot_ms)
           if record.slo_tpot_ms > 0 else None)
    live = _Live(record.sid, record.mode, record.prompt_len, list(record.tokens),
                 record.max_new_tokens, record.k_max, slo, record.last_round + 1, drafting,
                 _link(profile, record.sid))
    if drafting and record.state != "finished":
        await _open_drafter(ctx, live, record.sampling_params(), record.rebuild_seed(),
                            req.policy)
    log.info("session_resumed", sid=record.sid, committed=len(record.tokens),
             next_round=live.next_round)
    return live


async def _open_drafter(ctx, live: _Live, params: SamplingParams, seed, policy_spec) -> None:
    from services.edge_drafter.policies import policy_factory

    try:
        policy = policy_factory(policy_spec or "fixed", live.k_max)()
    except ValueError as exc:
        raise WispError(ErrorCode.BAD_REQUEST, str(exc)) from None
    core = ctx.drafter.core
    await ctx.drafter.call(core.open, live.sid, live.committed[: live.prompt_len],
                           live.max_new_tokens, params, policy, seed,
                           committed_output=live.output)


def _link(profile: DeviceProfile | None, sid: str) -> LinkEmulator | None:
    return LinkEmulator(profile, seed=int(sid[:16], 16)) if profile else None


# -- one round -------------------------------------------------------------------------------
async def _round(ctx: GenerationContext, live: _Live, start: float) -> wire.VerifyResult:
    draft = None
    draft_ms = 0.0
    if live.drafting:
        t0 = time.monotonic()
        draft = await ctx.drafter.draft(live.sid)
        if live.link:
            await asyncio.sleep(live.link.draft_delay_s(len(draft.token_ids),
                                                         time.monotonic() - t0))
        draft_ms = (time.monotonic() - t0) * 1e3
    k = len(draft.token_ids) if draft else 0
    request = wire.VerifyRequest(
        sid=live.sid, round=live.next_round, base_len=len(live.committed),
        draft_ids=list(draft.token_ids) if draft else [],
        draft_sparse_ids=draft.sparse_ids if draft else None,
        draft_sparse_probs=draft.sparse_probs if draft else None,
        budget_ms=_budget_ms(live, k, draft_ms, start), draft_ms=draft_ms,
        device_id=ctx.device_id)
    sent_at = time.monotonic()
    result = await _request(ctx, VERIFY_SUBMIT, request, wire.VerifyResult, link=live.link)
    rtt_ms = (time.monotonic() - sent_at) * 1e3
    if live.drafting:
        try:
            await ctx.drafter.call(ctx.drafter.core.apply, live.sid, result.num_accepted,
                                   list(result.new_tokens), rtt_ms / 1e3)
        except WispError:
            # The stored answer of this round was for another edge's draft (a resumed session
            # whose first edge was still alive): take the committed tokens as they are.
            log.warning("verdict_for_another_draft", round=request.round)
            await ctx.drafter.call(ctx.drafter.core.resync, live.sid,
                                   live.committed + list(result.new_tokens))
    live.committed.extend(result.new_tokens)
    live.next_round += 1
    live.stats.rounds += 1
    live.stats.drafted += k
    live.stats.accepted += result.num_accepted
    wasted_ms = sum(draft.token_times_s[result.num_accepted:]) * 1e3 if draft else 0.0
    await _publish(ctx, "round", live.sid, mode=live.mode, round=request.round, drafted=k,
                   accepted=result.num_accepted, draft_ms=round(draft_ms, 3),
                   wasted_draft_ms=round(wasted_ms, 3), rtt_ms=round(rtt_ms, 3),
                   budget_ms=round(request.budget_ms, 3))
    return result


def _budget_ms(live: _Live, k: int, draft_ms: float, start: float) -> float:
    """What the edge can still wait for this round's result (DESIGN.md §6)."""
    if live.slo is None:
        return NO_SLO_BUDGET_MS
    if not live.output:  # the first token is bound by the TTFT SLO
        return live.slo.ttft_ms - (time.monotonic() - start) * 1e3
    uplink_ms = live.link.profile.rtt_ms / 2 if live.link else 0.0
    return (k + 1) * live.slo.tpot_ms - draft_ms - uplink_ms


async def _request(ctx: GenerationContext, subject: str, msg, reply_cls, link=None):
    """NATS request, retried with the same payload (rounds are idempotent per (sid, round)).

    A timeout or a CAPACITY answer uses one of `verify_retries`; "no responders" (the scheduler
    is restarting) is waited out with backoff for up to `unavailable_timeout_s`.
    """
    payload = wire.encode(msg)
    loop = asyncio.get_running_loop()
    unavailable_until = None
    attempts, backoff_s, last = 0, 0.0, ""
    while True:
        try:
            if link:
                await asyncio.sleep(link.uplink_delay_s(len(payload)))
            reply = await ctx.nc.request(subject, payload, timeout=ctx.verify_timeout_s)
            if link:
                await asyncio.sleep(link.downlink_delay_s(len(reply.data)))
            return wire.decode_reply(reply_cls, reply.data)
        except nats.errors.NoRespondersError:
            unavailable_until = unavailable_until or loop.time() + ctx.unavailable_timeout_s
            if loop.time() > unavailable_until:
                raise WispError(ErrorCode.CAPACITY,
                                f"{subject}: no service answered for "
                                f"{ctx.unavailable_timeout_s:g} s") from None
            backoff_s = min(2.0, max(0.1, backoff_s * 2))
            log.info("request_waiting_for_responder", subject=subject, retry_in_s=backoff_s)
            await asyncio.sleep(backoff_s)
            continue
        except nats.errors.TimeoutError:
            last = "timeout"
        except WispError as err:
            if err.code != ErrorCode.CAPACITY:
                raise
            last = err.message
        unavailable_until = None
        attempts += 1
        if attempts > ctx.verify_retries:
            raise WispError(ErrorCode.CAPACITY,
                            f"{subject}: no answer after {attempts} tries ({last})")
        log.warning("request_retry", subject=subject, attempt=attempts, reason=last)
        await asyncio.sleep(min(2.0, 0.2 * attempts))


# -- ending ----------------------------------------------------------------------------------
def _done_message(live: _Live, start: float, first: float | None, end: float,
                  error: wire.ErrorInfo | None) -> wire.GenerateDone:
    n = len(live.output)
    ttft_ms = ((first or end) - start) * 1e3
    tpot_ms = (end - first) * 1e3 / (n - 1) if first is not None and n > 1 else 0.0
    if error is not None:
        reason = "error"
    elif n >= live.max_new_tokens:
        reason = "length"
    else:
        reason = "eos"
    return wire.GenerateDone(
        sid=live.sid, finish_reason=reason, num_tokens=n,
        timings=wire.GenerateTimings(ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                                     e2e_ms=(end - start) * 1e3),
        stats=live.stats, error=error)


async def _publish_request_event(ctx, live: _Live, done: wire.GenerateDone) -> None:
    t = done.timings
    slo_ttft = live.slo.ttft_ms if live.slo else 0.0
    slo_tpot = live.slo.tpot_ms if live.slo else 0.0
    met = (done.error is None and live.slo is not None
           and t.ttft_ms <= slo_ttft and t.tpot_ms <= slo_tpot)
    await _publish(ctx, "request", live.sid, mode=live.mode, num_tokens=done.num_tokens,
                   ttft_ms=round(t.ttft_ms, 3), tpot_ms=round(t.tpot_ms, 3),
                   e2e_ms=round(t.e2e_ms, 3), slo_ttft_ms=slo_ttft, slo_tpot_ms=slo_tpot,
                   slo_met=met, rounds=live.stats.rounds, drafted=live.stats.drafted,
                   accepted=live.stats.accepted, finish_reason=done.finish_reason)


async def _publish(ctx, kind: str, sid: str, **fields) -> None:
    msg = wire.Event(kind=kind, ts_ms=time.time() * 1e3, sid=sid, fields=fields)
    await ctx.nc.publish(event(kind), wire.encode(msg))


async def _close(ctx: GenerationContext, live: _Live) -> None:
    if live.drafting:
        await ctx.drafter.call(ctx.drafter.core.close, live.sid)
    await ctx.nc.publish(SESSION_CLOSE, wire.encode(wire.SessionClose(sid=live.sid)))
