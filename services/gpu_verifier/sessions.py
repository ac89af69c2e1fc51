"""Redis ↔ verifier core: the core's view of a session is always the one Redis owns.

A verifier's sessions are soft state. Before a batch runs, every request whose session the core
does not know, or knows at another committed length than the request's `base_len`, is looked up
in the session store; when the core's committed tokens differ from Redis's, the session is
(re)opened from the record: committed output, sampling parameters and the last answered round
with its stored result, so that a retry of that round is answered identically even on a
verifier that never saw the session (failover). After the batch, each result is committed with
the store's atomic `commit_round` (service.py); a refusal makes the core forget the session, so
the next batch rebuilds it from Redis.

Core mutations happen under the caller's lock: the worker may be running the next batch's
forward pass in a thread while this batch's commits are still being answered.
"""

from __future__ import annotations

import asyncio

import structlog

from common.engine.verifier import VerifierCore
from common.errors import ErrorCode, WispError
from common.protocol import VerifyRequest, VerifyResult, decode
from common.store import SessionRecord, SessionStore

log = structlog.get_logger(__name__)

_REDIS_CONCURRENCY = 32  # session loads in flight at once


async def ensure_sessions(core: VerifierCore, store: SessionStore, lock: asyncio.Lock,
                          requests: list[VerifyRequest]) -> list[WispError | None]:
    """Per request: None when the core is ready for it, else the error to answer with."""
    sids = sorted({r.sid for r in requests if not _is_current(core, r)})
    limit = asyncio.Semaphore(_REDIS_CONCURRENCY)

    async def load(sid: str) -> SessionRecord | WispError | None:
        async with limit:
            try:
                return await store.load(sid)
            except ValueError as exc:
                return WispError(ErrorCode.INTERNAL, f"session {sid} has a corrupt record: {exc}")

    records = await asyncio.gather(*(load(sid) for sid in sids))
    problems: dict[str, WispError | None] = {}
    async with lock:
        for sid, record in zip(sids, records, strict=True):
            with structlog.contextvars.bound_contextvars(sid=sid):
                problems[sid] = _sync(core, sid, record)
    return [problems.get(r.sid) for r in requests]


def stored_result(blob: bytes) -> VerifyResult | None:
    """The `VerifyResult` Redis stored as a round's answer, or None."""
    if not blob:
        return None
    try:
        return decode(VerifyResult, blob)
    except WispError as err:
        log.warning("stored_result_unreadable", reason=err.message)
        return None


def _is_current(core: VerifierCore, request: VerifyRequest) -> bool:
    return (request.sid in core.sessions
            and len(core.sessions[request.sid].committed) == request.base_len)


def _sync(core: VerifierCore, sid: str,
          record: SessionRecord | WispError | None) -> WispError | None:
    if isinstance(record, WispError):
        core.close_session(sid)
        return record
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
    if sid in core.sessions and core.sessions[sid].committed == record.tokens:
        # The core agrees with Redis (the request itself is off, or a retry of the last
        # round): keep the session and its KV; the core answers or refuses the round.
        return None
    last = stored_result(record.last_result)
    if last is not None and last.round != record.last_round:
        last = None  # not the answer to the last round: never replay it
    core.open_session(record.spec, record.prompt_ids, record.output_ids,
                      last_round=record.last_round, last_result=last)
    log.info("session_loaded", committed_len=record.committed_len,
             last_round=record.last_round)
    return None
