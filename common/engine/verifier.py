"""Verifier core: sessions, one batched forward, acceptance, KV rollback.

No NATS, no Redis: the gpu-verifier service feeds this from the wire and persists what it
returns; the in-process engine calls it directly. Requests were checked where they entered
(common.protocol for their shape, common.limits for the model's numbers); what is left here is
what depends on the session's state: an unknown or finished session, a round drafted from
another committed length, a stale round, a session twice in one batch.

Each session's committed tokens (prompt + accepted output) are mirrored here; the runner's KV is
soft state, so whatever part of the committed tokens the runner no longer holds is simply sent
again in the same batch (a cold prefill or a partial rebuild).

KV invariant between rounds: the runner holds KV for committed[:-1] at most. The last committed
token (the previous round's bonus token) has been sampled but not yet fed, so a round feeds
`committed[cached:] + draft` and reads logits for the last k+1 positions:
row i scores draft[i] (i < k); row k yields the bonus token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import structlog
import torch

from common.errors import ErrorCode, WispError
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, uncached_tail
from common.protocol import SessionSpec, VerifyRequest, VerifyResult
from common.sampling import greedy_accept, session_seed, speculative_accept, target_probs

__all__ = ["Verified", "VerifierCore"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Verified:
    """A round's result (timing fields left for the caller) and what it cost the forward."""

    result: VerifyResult
    num_fed: int  # tokens fed this round (estimator: new tokens)
    num_cached: int  # cached tokens the round's tokens attended to
    replayed: bool = False  # answered from memory (a retry): no forward work
    greedy: bool = True  # the session's sampling (for verdict events)


@dataclass(slots=True)
class _Session:
    spec: SessionSpec
    prompt_len: int
    committed: list[int]
    generator: torch.Generator
    last_result: VerifyResult | None = None  # the answer to the last round, for retries
    last_round: int = -1
    finished: bool = False

    @property
    def num_output(self) -> int:
        return len(self.committed) - self.prompt_len


@dataclass(slots=True)
class _Prepared:
    request: VerifyRequest
    session: _Session
    sparse_ids: torch.Tensor | None = None  # [k, m] int64, sampling only
    sparse_probs: torch.Tensor | None = None  # [k, m] float32, sampling only


class VerifierCore:
    def __init__(self, runner: ModelRunner, eos_token_id: int | None):
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.sessions: dict[str, _Session] = {}

    # -- sessions ---------------------------------------------------------------------------
    def open_session(self, spec: SessionSpec, prompt_ids: list[int],
                     committed_output: list[int] | None = None, last_round: int = -1,
                     last_result: VerifyResult | None = None) -> None:
        """Register a session. A session rebuilt from the store passes its committed output and
        its last answered round with its result, so a retry of that round gets the same
        answer. Its tokens were checked against this model's limits when it was opened."""
        committed = list(prompt_ids) + list(committed_output or [])
        seed = session_seed(spec.seed, len(committed), len(prompt_ids))
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        self.runner.free(spec.sid)  # a re-opened sid never reuses stale KV
        session = _Session(spec, len(prompt_ids), committed, torch.Generator().manual_seed(seed),
                           last_result, last_round)
        session.finished = self._finished(session)
        self.sessions[spec.sid] = session

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.runner.free(sid)

    def committed(self, sid: str) -> list[int]:
        return list(self._session(sid).committed)

    # -- verification -----------------------------------------------------------------------
    def verify_batch(self, requests: list[VerifyRequest]) -> list[Verified | WispError]:
        """Verify every request with one forward pass; a request that cannot be served gets
        its error and the others proceed."""
        results: list[Verified | WispError | None] = [None] * len(requests)
        prepared: list[tuple[int, _Prepared]] = []
        seen: set[str] = set()
        for i, request in enumerate(requests):
            try:
                if request.sid in seen:
                    raise WispError(ErrorCode.BAD_REQUEST,
                                    f"session {request.sid} appears twice in one batch")
                replay = self._replayed(request)
                if replay is not None:
                    results[i] = Verified(replay, 0, 0, replayed=True,
                                          greedy=self.sessions[request.sid].spec.sampling.greedy)
                    continue
                prepared.append((i, self._prepare(request)))
                seen.add(request.sid)
            except WispError as err:
                log.warning("verify_rejected", sid=request.sid, round=request.round,
                            code=str(err.code), reason=err.message)
                results[i] = err
        for i, outcome in self._run(prepared):
            results[i] = outcome
        return results  # type: ignore[return-value]

    def _forward_item(self, p: _Prepared) -> tuple[ForwardItem, int]:
        """Built right before the forward: an earlier sub-batch may have evicted this KV."""
        tail, cached = uncached_tail(self.runner, p.request.sid, p.session.committed)
        tokens = tail + list(p.request.draft_ids)
        return ForwardItem(p.request.sid, tokens, num_logits=len(p.request.draft_ids) + 1), cached

    def _run(self, prepared: list[tuple[int, _Prepared]]):
        if not prepared:
            return []
        forwards = [self._forward_item(p) for _, p in prepared]
        try:
            logits = self.runner.forward([f for f, _ in forwards])
        except KVCacheFull:
            if len(prepared) == 1:
                i, p = prepared[0]
                return [(i, WispError(ErrorCode.CAPACITY,
                                      f"no KV room for session {p.request.sid}; retry later"))]
            # Too big together but maybe not apart: halve (each half is still one pass).
            half = len(prepared) // 2
            return self._run(prepared[:half]) + self._run(prepared[half:])
        return [(i, self._accept_one(p, row_logits, len(f.token_ids), cached))
                for (i, p), (f, cached), row_logits in zip(prepared, forwards, logits, strict=True)]

    def _replayed(self, request: VerifyRequest) -> VerifyResult | None:
        session = self._session(request.sid)
        if request.round == session.last_round and session.last_result is not None:
            # Idempotent retry: same (sid, round) gets the same answer, nothing re-applied.
            return session.last_result
        if request.round <= session.last_round:
            raise WispError(ErrorCode.STALE_ROUND,
                            f"round {request.round} of session {request.sid} is older than the "
                            f"last answered round {session.last_round}")
        return None

    def _prepare(self, request: VerifyRequest) -> _Prepared:
        session = self._session(request.sid)
        if session.finished:
            raise WispError(ErrorCode.SESSION_FINISHED, f"session {request.sid} has finished")
        if request.base_len != len(session.committed):
            raise WispError(ErrorCode.BASE_MISMATCH,
                            f"round {request.round} of session {request.sid} drafts from "
                            f"{request.base_len} committed tokens but {len(session.committed)} "
                            "are committed")
        if session.spec.sampling.greedy or not request.draft_ids:
            return _Prepared(request, session)
        k = len(request.draft_ids)
        return _Prepared(request, session,
                         torch.tensor(request.draft_sparse_ids, dtype=torch.long).reshape(k, -1),
                         torch.tensor(request.draft_sparse_probs).reshape(k, -1))

    def _accept_one(self, p: _Prepared, logits: torch.Tensor, num_fed: int,
                    num_cached: int) -> Verified | WispError:
        """Acceptance for one request; a failure here (non-finite logits, a numeric edge case)
        fails this request alone and leaves its session as it was before the round."""
        try:
            return self._accept(p, logits, num_fed, num_cached)
        except Exception as exc:  # noqa: BLE001 - isolate the item, keep the batch
            sid = p.request.sid
            log.exception("accept_failed", sid=sid, round=p.request.round)
            self.runner.truncate(sid, len(p.session.committed) - 1)
            return WispError(ErrorCode.INTERNAL, f"round {p.request.round} of session {sid} "
                             f"could not be verified: {type(exc).__name__}: {exc}")

    def _accept(self, p: _Prepared, logits: torch.Tensor, num_fed: int,
                num_cached: int) -> Verified:
        """logits [k+1, V]: row i scores draft[i]; row k gives the bonus token."""
        request, session = p.request, p.session
        params = session.spec.sampling
        if params.greedy:
            num_accepted, next_token = greedy_accept(request.draft_ids, logits)
        elif not request.draft_ids:  # nothing drafted: the target samples alone
            num_accepted, next_token = speculative_accept(
                [], torch.empty(0, 1, dtype=torch.long), torch.empty(0, 1),
                target_probs(logits, params), session.generator)
        else:
            num_accepted, next_token = speculative_accept(
                request.draft_ids, p.sparse_ids, p.sparse_probs, target_probs(logits, params),
                session.generator)
        base = len(session.committed)
        new_tokens = self._cut(session, list(request.draft_ids[:num_accepted]) + [next_token])
        session.committed.extend(new_tokens)
        # KV now holds committed[:base] + draft; keep the accepted drafts, never the last
        # committed token (new_tokens may have been cut short at EOS or max_new_tokens).
        self.runner.truncate(request.sid, min(base + num_accepted, len(session.committed) - 1))
        session.finished = self._finished(session)
        result = VerifyResult(
            sid=request.sid, round=request.round, num_drafted=len(request.draft_ids),
            num_accepted=num_accepted, new_tokens=new_tokens,
            committed_len=len(session.committed), finished=session.finished)
        session.last_round, session.last_result = request.round, result
        return Verified(result, num_fed, num_cached, greedy=params.greedy)

    def _cut(self, session: _Session, tokens: list[int]) -> list[int]:
        """Stop at EOS (kept) and at max_new_tokens."""
        room = session.spec.max_new_tokens - session.num_output
        tokens = tokens[:room]
        if self.eos_token_id is not None and self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id) + 1]
        return tokens

    def _finished(self, session: _Session) -> bool:
        return (session.num_output >= session.spec.max_new_tokens
                or (self.eos_token_id is not None and session.num_output > 0
                    and session.committed[-1] == self.eos_token_id))

    def _session(self, sid: str) -> _Session:
        session = self.sessions.get(sid)
        if session is None:
            raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
        return session
