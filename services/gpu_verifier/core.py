"""Verifier core: sessions, validation, one batched forward, acceptance, KV rollback.

No NATS, no Redis: the gpu-verifier service feeds this from the wire and persists what it
returns. Each session's committed tokens (prompt + accepted output) are mirrored here; the
runner's KV is soft state, so whatever part of the committed tokens the runner no longer holds
is simply sent again in the same batch (a cold prefill or a partial rebuild).

KV invariant between rounds: the runner holds KV for committed[:-1] at most. The last committed
token (the previous round's bonus token) has been sampled but not yet fed, so a round feeds
`committed[cached:] + draft` and reads logits for the last k+1 positions:
row i scores draft[i] (i < k); row k yields the bonus token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import structlog
import torch

from common.errors import ErrorCode, WispError
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, uncached_tail
from common.sampling import SamplingParams, greedy_accept, speculative_accept, target_probs

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class SessionSpec:
    sid: str
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    # Output already committed (a session rebuilt from the session store after a failover).
    committed_output: list[int] = field(default_factory=list)


@dataclass(slots=True)
class VerifyItem:
    sid: str
    round: int
    base_len: int  # committed length the edge drafted from
    draft_ids: list[int]  # [k]
    # Only when sampling: the draft's sparse top-m distribution per drafted position.
    draft_sparse_ids: list[list[int]] | None = None  # [k][m]
    draft_sparse_probs: list[list[float]] | None = None  # [k][m]


@dataclass(slots=True)
class VerifyOutcome:
    sid: str
    round: int
    num_drafted: int
    num_accepted: int
    new_tokens: list[int]  # accepted drafts + the target's token; cut at EOS / max_new_tokens
    committed_len: int  # after this round
    finished: bool
    # For the latency estimator (DESIGN.md §6): tokens fed this round and cached tokens read.
    num_input_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class _Session:
    spec: SessionSpec
    committed: list[int]
    generator: torch.Generator
    last_round: int = -1
    last_outcome: VerifyOutcome | None = None
    finished: bool = False

    @property
    def num_output(self) -> int:
        return len(self.committed) - len(self.spec.prompt_ids)


@dataclass(slots=True)
class _Prepared:
    item: VerifyItem
    session: _Session
    sparse_ids: torch.Tensor | None = None  # [k, m] int64, sampling only
    sparse_probs: torch.Tensor | None = None  # [k, m] float32, sampling only


class VerifierCore:
    def __init__(self, runner: ModelRunner, eos_token_id: int | None, k_max: int = 16,
                 max_prompt_tokens: int | None = None):
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.k_max = k_max
        self.max_prompt_tokens = max_prompt_tokens or runner.max_positions // 2
        self.sessions: dict[str, _Session] = {}

    # -- sessions ---------------------------------------------------------------------------
    def open_session(self, spec: SessionSpec, last_round: int = -1,
                     last_outcome: VerifyOutcome | None = None) -> None:
        """Register a session. A session rebuilt from the store passes its committed output in
        `spec` and its last answered round, so a retry of that round gets the same answer."""
        if not spec.prompt_ids:
            raise WispError(ErrorCode.BAD_REQUEST, "prompt is empty")
        if len(spec.prompt_ids) > self.max_prompt_tokens:
            raise WispError(ErrorCode.PROMPT_TOO_LONG,
                            f"prompt has {len(spec.prompt_ids)} tokens; the limit is "
                            f"{self.max_prompt_tokens}")
        if spec.max_new_tokens < 1:
            raise WispError(ErrorCode.BAD_REQUEST, "max_new_tokens must be >= 1")
        total = len(spec.prompt_ids) + spec.max_new_tokens + self.k_max
        if total > self.runner.max_positions:
            raise WispError(ErrorCode.SEQUENCE_TOO_LONG,
                            f"prompt ({len(spec.prompt_ids)}) + max_new_tokens "
                            f"({spec.max_new_tokens}) + k_max ({self.k_max}) exceeds the "
                            f"target's context of {self.runner.max_positions} tokens")
        self._check_ids(spec.prompt_ids + spec.committed_output, "prompt")
        seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(8), "little")
        generator = torch.Generator().manual_seed(seed)
        committed = list(spec.prompt_ids) + list(spec.committed_output)
        self.runner.free(spec.sid)  # a re-opened sid never reuses stale KV
        session = _Session(spec, committed, generator, last_round, last_outcome)
        session.finished = self._finished(session)
        self.sessions[spec.sid] = session

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.runner.free(sid)

    def committed(self, sid: str) -> list[int]:
        return list(self._session(sid).committed)

    # -- verification -----------------------------------------------------------------------
    def verify_batch(self, items: list[VerifyItem]) -> list[VerifyOutcome | WispError]:
        """Verify every item with one forward pass; a bad item gets its error, others proceed."""
        results: list[VerifyOutcome | WispError | None] = [None] * len(items)
        prepared: list[tuple[int, _Prepared]] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                if item.sid in seen:
                    raise WispError(ErrorCode.BAD_REQUEST,
                                    f"session {item.sid} appears twice in one batch")
                replay = self._replayed(item)
                if replay is not None:
                    results[i] = replay
                    continue
                prepared.append((i, self._prepare(item)))
                seen.add(item.sid)
            except WispError as err:
                log.warning("verify_rejected", sid=item.sid, round=item.round,
                            code=str(err.code), reason=err.message)
                results[i] = err
        for i, outcome in self._run(prepared):
            results[i] = outcome
        return results  # type: ignore[return-value]

    def _forward_item(self, p: _Prepared) -> tuple[ForwardItem, int]:
        """Built right before the forward: an earlier sub-batch may have evicted this KV."""
        tail, cached = uncached_tail(self.runner, p.item.sid, p.session.committed)
        tokens = tail + list(p.item.draft_ids)
        return ForwardItem(p.item.sid, tokens, num_logits=len(p.item.draft_ids) + 1), cached

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
                                      f"no KV room for session {p.item.sid}; retry later"))]
            # Too big together but maybe not apart: halve (each half is still one pass).
            half = len(prepared) // 2
            return self._run(prepared[:half]) + self._run(prepared[half:])
        return [(i, self._accept(p, row_logits, len(f.token_ids), cached))
                for (i, p), (f, cached), row_logits in zip(prepared, forwards, logits, strict=True)]

    def _replayed(self, item: VerifyItem) -> VerifyOutcome | None:
        session = self._session(item.sid)
        if item.round == session.last_round and session.last_outcome is not None:
            # Idempotent retry: same (sid, round) gets the same answer, nothing re-applied.
            return session.last_outcome
        if item.round <= session.last_round:
            raise WispError(ErrorCode.STALE_ROUND,
                            f"round {item.round} of session {item.sid} is older than the last "
                            f"answered round {session.last_round}")
        return None

    def _prepare(self, item: VerifyItem) -> _Prepared:
        session = self._session(item.sid)
        if session.finished:
            raise WispError(ErrorCode.SESSION_FINISHED, f"session {item.sid} has finished")
        if item.base_len != len(session.committed):
            raise WispError(ErrorCode.BASE_MISMATCH,
                            f"round {item.round} of session {item.sid} drafts from "
                            f"{item.base_len} committed tokens but {len(session.committed)} "
                            "are committed")
        k = len(item.draft_ids)
        if k > self.k_max:
            raise WispError(ErrorCode.DRAFT_TOO_LONG,
                            f"draft has {k} tokens; k_max is {self.k_max}")
        self._check_ids(item.draft_ids, "draft")
        sparse = (None, None) if session.spec.params.greedy else self._sparse_tensors(item, k)
        return _Prepared(item, session, *sparse)

    def _accept(self, p: _Prepared, logits: torch.Tensor, num_input: int,
                num_cached: int) -> VerifyOutcome:
        """logits [k+1, V]: row i scores draft[i]; row k gives the bonus token."""
        item, session = p.item, p.session
        params = session.spec.params
        if params.greedy:
            num_accepted, next_token = greedy_accept(item.draft_ids, logits)
        else:
            probs = target_probs(logits, params)
            num_accepted, next_token = speculative_accept(
                item.draft_ids, p.sparse_ids, p.sparse_probs, probs, session.generator)
        base = len(session.committed)
        # KV now holds committed + draft; keep committed + the accepted drafts.
        self.runner.truncate(item.sid, base + num_accepted)
        new_tokens = self._cut(session, list(item.draft_ids[:num_accepted]) + [next_token])
        session.committed.extend(new_tokens)
        session.finished = self._finished(session)
        outcome = VerifyOutcome(
            sid=item.sid, round=item.round, num_drafted=len(item.draft_ids),
            num_accepted=num_accepted, new_tokens=new_tokens,
            committed_len=len(session.committed), finished=session.finished,
            num_input_tokens=num_input, num_cached_tokens=num_cached)
        session.last_round, session.last_outcome = item.round, outcome
        return outcome

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

    # -- validation -------------------------------------------------------------------------
    def _session(self, sid: str) -> _Session:
        session = self.sessions.get(sid)
        if session is None:
            raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
        return session

    def _check_ids(self, ids: list[int], what: str) -> None:
        vocab = self.runner.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise WispError(ErrorCode.OUT_OF_VOCABULARY,
                            f"{what} holds {len(bad)} token ids outside [0, {vocab}), "
                            f"e.g. {bad[0]!r}")

    def _sparse_tensors(self, item: VerifyItem, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the draft's sparse distributions; returns (ids [k, m], probs [k, m])."""
        ids, probs = item.draft_sparse_ids, item.draft_sparse_probs
        if k == 0 and not ids and not probs:  # nothing drafted: the target samples alone
            return torch.empty(0, 1, dtype=torch.long), torch.empty(0, 1)
        if ids is None or probs is None or len(ids) != k or len(probs) != k:
            raise WispError(ErrorCode.BAD_REQUEST,
                            "sampling needs the draft's sparse distribution for each of the "
                            f"{k} drafted tokens")
        widths = {len(row) for row in ids} | {len(row) for row in probs}
        if k and (len(widths) != 1 or 0 in widths):
            raise WispError(ErrorCode.BAD_REQUEST,
                            "every sparse distribution needs the same number (m >= 1) of ids "
                            "and probabilities")
        for row in ids:
            self._check_ids(list(row), "sparse draft distribution")
        m = widths.pop() if k else 1
        try:
            ids_t = torch.tensor(ids, dtype=torch.long).reshape(k, m)
            probs_t = torch.tensor(probs, dtype=torch.float32).reshape(k, m)
        except (TypeError, ValueError) as exc:
            raise WispError(ErrorCode.BAD_REQUEST, f"malformed sparse distribution: {exc}") from exc
        if k and (bool((probs_t < 0).any())
                  or not torch.allclose(probs_t.sum(-1), torch.ones(k), atol=1e-3)):
            raise WispError(ErrorCode.BAD_REQUEST,
                            "sparse draft probabilities must be >= 0 and sum to 1 per position")
        drafted = torch.tensor(item.draft_ids, dtype=torch.long).reshape(k, 1)
        if k and not bool((ids_t == drafted).any(-1).all()):
            raise WispError(ErrorCode.BAD_REQUEST,
                            "a drafted token is missing from its own sparse distribution")
        return ids_t, probs_t
