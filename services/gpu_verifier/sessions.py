"""Redis ↔ verifier core: the core's view of a session is always the one Redis owns.

A verifier's sessions are soft state (DESIGN.md §3). Before a batch runs, every request whose
session the core does not know, or knows at another committed length than the request's
`base_len`, is looked up in the session store; when the core's committed tokens differ from
Redis's, the session is (re)opened from the record: committed output, sampling parameters and
the last answered round with its stored result, so that a retry of that round is answered
identically even on a verifier that never saw the session (failover). After the batch,
each outcome is committed with the store's atomic `commit_round`; a refusal makes the core
forget the session, so the next batch rebuilds it from Redis.
"""

from __future__ import annotations

import asyncio

import structlog

from common.errors import ErrorCode, WispError
from common.protocol import VerifyRequest, VerifyResult, decode
from common.store import CommitStatus, SessionRecord, SessionStore
from services.gpu_verifier.core import SessionSpec, VerifierCore, VerifyOutcome

log = structlog.get_logger(__name__)

_REDIS_CONCURRENCY = 32  # session loads in flight at once


async def ensure_sessions(core: VerifierCore, store: SessionStore,
                          requests: list[VerifyRequest]) -> list[WispError | None]:
    """Per request: None when the core is ready for it, else the error to answer with."""
    stale = {r.sid for r in requests if not _is_current(core, r)}
    sids = sorted(stale)
    limit = asyncio.Semaphore(_REDIS_CONCURRENCY)

    async def load(sid: str) -> SessionRecord | None:
        async with limit:
            return await store.load(sid)

    records = await asyncio.gather(*(load(sid) for sid in sids))
    problems: dict[str, WispError | None] = {}
    for sid, record in zip(sids, records, strict=True):
        with structlog.contextvars.bound_contextvars(sid=sid):
            problems[sid] = _sync(core, sid, record)
    return [problems.get(r.sid) for r in requests]


async def commit_round(core: VerifierCore, store: SessionStore, request: VerifyRequest,
                       outcome: VerifyOutcome, blob: bytes) -> tuple[bytes, CommitStatus]:
    """Commit a verified round to Redis; return the payload to reply with (`blob`, or the
    stored result of a replayed round) or raise the error to reply with. Whenever Redis
    refuses the core's view, the core forgets the session so the next batch reloads it."""
    sid = request.sid
    status, committed = await store.commit_round(sid, request.round, request.base_len,
                                                 outcome.new_tokens, blob, outcome.finished)
    if status == CommitStatus.APPLIED:
        if outcome.finished:
            core.close_session(sid)  # free its KV now; a retry of this round reloads it
        return blob, status
    if status == CommitStatus.REPLAYED:
        record = await store.load(sid)
        if record is None or not record.last_result:
            core.close_session(sid)
            raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
        if sid in core.sessions and core.committed(sid) != record.tokens:
            core.close_session(sid)  # another verifier committed this round
        return record.last_result, status
    core.close_session(sid)
    if status == CommitStatus.MISMATCH:
        raise WispError(ErrorCode.BASE_MISMATCH,
                        f"round {request.round} of session {sid} drafts from "
                        f"{request.base_len} committed tokens but the store holds {committed}")
    raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")


def outcome_from_result(blob: bytes) -> VerifyOutcome | None:
    """The core's view of a stored `VerifyResult` (estimator features are not stored: 0)."""
    if not blob:
        return None
    try:
        res = decode(VerifyResult, blob)
    except WispError as err:
        log.warning("stored_result_unreadable", reason=err.message)
        return None
    return VerifyOutcome(sid=res.sid, round=res.round, num_drafted=res.num_drafted,
                         num_accepted=res.num_accepted, new_tokens=list(res.new_tokens),
                         committed_len=res.committed_len, finished=res.finished,
                         num_input_tokens=0, num_cached_tokens=0)


def spec_from_record(record: SessionRecord) -> SessionSpec:
    return SessionSpec(sid=record.sid, prompt_ids=record.prompt_ids,
                       max_new_tokens=record.max_new_tokens, params=record.sampling_params(),
                       seed=record.rebuild_seed(), committed_output=record.output_ids)


def _is_current(core: VerifierCore, request: VerifyRequest) -> bool:
    return (request.sid in core.sessions
            and len(core.committed(request.sid)) == request.base_len)


def _sync(core: VerifierCore, sid: str, record: SessionRecord | None) -> WispError | None:
    if record is None:
        core.close_session(sid)
        return WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
    if record.state == "closed":
        core.close_session(sid)
        return WispError(ErrorCode.UNKNOWN_SESSION, f"session {sid} is closed")
    if len(record.tokens) != record.committed_len or record.prompt_len > len(record.tokens):
        core.close_session(sid)
        return WispError(ErrorCode.UNKNOWN_SESSION,
                         f"session {sid}: its committed tokens are gone from the store")
    if sid in core.sessions and core.committed(sid) == record.tokens:
        # The core agrees with Redis (the request itself is off, or a retry of the last
        # round): keep the session and its KV; the core answers or refuses the round.
        return None
    last_outcome = outcome_from_result(record.last_result)
    if last_outcome is not None and last_outcome.round != record.last_round:
        last_outcome = None  # not the answer to the last round: never replay it
    try:
        core.open_session(spec_from_record(record), last_round=record.last_round,
                          last_outcome=last_outcome)
    except WispError as err:
        core.close_session(sid)
        return err
    except ValueError as err:  # SamplingParams of a corrupt record
        core.close_session(sid)
        return WispError(ErrorCode.INTERNAL, f"session {sid} has a corrupt record: {err}")
    log.info("session_loaded", committed_len=record.committed_len,
             last_round=record.last_round)
    return None
