"""The edge session core: the one round loop of a session, without NATS.

Every driver runs rounds through `SessionCore.round`: the edge-drafter (a `DraftBatcher` and a
NATS verify port, maybe wrapped by a device emulation), the scheduler's server-side modes
(`centralized`: no drafter, k = 0 every round; `colocated`: the server's own drafter) and the
in-process engine (the cores called directly, one lockstep batch per step). A round is:

1. draft (the drafter core asks the session's policy, batched with the driver's other
   sessions), unless the session does not draft;
2. build the `VerifyRequest`: drafted ids, sparse draft distributions when sampling, the
   features the policy saw, and the latency budget the SLO leaves (docs/architecture.md,
   "Deadlines");
3. submit it through the verify port and wait for the verdict;
4. apply the verdict to the draft KV, or resync to the committed tokens when the verdict was
   for another edge's draft of this round (a resumed session whose first edge lived on);
5. extend the committed tokens and the stats; the round's `RoundEvent` is returned.

Ports are small protocols, so a test drives a policy through this core with in-process fakes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from common.errors import ErrorCode, WispError
from common.protocol import (
    ErrorInfo,
    GenerateDone,
    GenerateStats,
    GenerateTimings,
    RequestEvent,
    RoundEvent,
    SessionSpec,
    VerifyRequest,
    VerifyResult,
)

if TYPE_CHECKING:
    from common.engine.drafter import Draft

__all__ = ["NO_SLO_BUDGET_MS", "DraftPort", "EdgeSession", "SessionCore", "VerifyPort"]

log = structlog.get_logger(__name__)

NO_SLO_BUDGET_MS = 600_000.0  # a session without an SLO is in no hurry


class DraftPort(Protocol):
    """The drafter core as a round sees it (batched across the driver's sessions)."""

    async def draft(self, sid: str) -> Draft: ...

    async def apply(self, sid: str, num_accepted: int, new_tokens: list[int],
                    round_trip_s: float | None) -> None:
        """BASE_MISMATCH when the verdict is not on the session's outstanding draft."""

    async def resync(self, sid: str, committed: list[int]) -> None: ...


class VerifyPort(Protocol):
    """Where verify requests go (NATS to the scheduler, or a verifier core in-process)."""

    uplink_ms: float  # the edge's estimate of its one-way time to the server (budget)

    async def submit(self, request: VerifyRequest) -> VerifyResult: ...


@dataclass(slots=True)
class EdgeSession:
    """A session as its edge drives it. Times are the driver's clock, in seconds."""

    spec: SessionSpec
    prompt_len: int
    committed: list[int]  # prompt + accepted output
    drafting: bool
    started_s: float
    next_round: int = 0
    finished: bool = False
    first_token_s: float | None = None
    last_rtt_ms: float | None = None  # the previous round's measured round trip (downlink)
    stats: GenerateStats = field(default_factory=GenerateStats)

    @property
    def sid(self) -> str:
        return self.spec.sid

    @property
    def output(self) -> list[int]:
        return self.committed[self.prompt_len:]


class SessionCore:
    def __init__(self, verifier: VerifyPort, drafter: DraftPort | None,
                 eos_token_id: int | None, clock: Callable[[], float] = time.monotonic):
        self.verifier = verifier
        self.drafter = drafter
        self.eos_token_id = eos_token_id
        self.clock = clock

    def session(self, spec: SessionSpec, prompt_ids: list[int],
                committed_output: list[int] | None = None, next_round: int = 0,
                started_s: float | None = None) -> EdgeSession:
        """A new (or, with committed output and a next round, resumed) session."""
        s = EdgeSession(spec, len(prompt_ids), list(prompt_ids) + list(committed_output or []),
                        drafting=self.drafter is not None,
                        started_s=self.clock() if started_s is None else started_s,
                        next_round=next_round)
        s.finished = self.is_finished(s)
        if s.output:
            s.first_token_s = s.started_s
        return s

    def is_finished(self, s: EdgeSession) -> bool:
        out = s.output
        return len(out) >= s.spec.max_new_tokens or (
            bool(out) and self.eos_token_id is not None and out[-1] == self.eos_token_id)

    async def run(self, s: EdgeSession,
                  on_tokens: Callable[[EdgeSession], Awaitable[None]] | None = None,
                  on_round: Callable[[RoundEvent], Awaitable[None]] | None = None) -> None:
        """Rounds until the session finishes; `on_tokens` after each round that committed
        tokens, `on_round` after every round."""
        while not s.finished:
            event = await self.round(s)
            if on_round is not None:
                await on_round(event)
            if event.committed and on_tokens is not None:
                await on_tokens(s)

    async def round(self, s: EdgeSession) -> RoundEvent:
        draft: Draft | None = None
        draft_ms = 0.0
        if s.drafting:
            t0 = self.clock()
            draft = await self.drafter.draft(s.sid)
            draft_ms = (self.clock() - t0) * 1e3
        k = len(draft.token_ids) if draft else 0
        request = VerifyRequest(
            sid=s.sid, round=s.next_round, base_len=len(s.committed),
            draft_ids=list(draft.token_ids) if draft else [],
            draft_sparse_ids=draft.sparse_ids if draft else None,
            draft_sparse_probs=draft.sparse_probs if draft else None,
            draft_features=draft.features if draft else None,
            budget_ms=self.budget_ms(s, k, draft_ms), draft_ms=draft_ms,
            device_id=s.spec.device_id, policy=draft.policy if draft else None,
            predictor_version=draft.predictor_version if draft else None,
            censored=draft.censored if draft else False, prev_rtt_ms=s.last_rtt_ms)
        sent = self.clock()
        result = await self.verifier.submit(request)
        rtt_ms = s.last_rtt_ms = (self.clock() - sent) * 1e3
        if draft is not None:
            await self._apply(s, result, rtt_ms)
        s.committed.extend(result.new_tokens)
        s.next_round += 1
        s.finished = result.finished or self.is_finished(s)
        if result.new_tokens and s.first_token_s is None:
            s.first_token_s = self.clock()
        stats = s.stats
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += result.num_accepted
        wasted_ms = draft.wasted_time_s(result.num_accepted) * 1e3 if draft else 0.0
        stats.wasted_draft_ms += wasted_ms
        return RoundEvent(
            ts_ms=time.time() * 1e3, sid=s.sid, mode=s.spec.mode, round=request.round,
            drafted=k, accepted=result.num_accepted, committed=len(result.new_tokens),
            draft_ms=draft_ms, wasted_draft_ms=wasted_ms, rtt_ms=rtt_ms,
            budget_ms=request.budget_ms, batch_size=result.batch_size,
            policy=draft.policy if draft else None,
            predictor_version=draft.predictor_version if draft else None)

    async def _apply(self, s: EdgeSession, result: VerifyResult, rtt_ms: float) -> None:
        try:
            await self.drafter.apply(s.sid, result.num_accepted, list(result.new_tokens),
                                     rtt_ms / 1e3)
        except WispError as err:
            if err.code != ErrorCode.BASE_MISMATCH:
                raise
            # The stored answer of this round was for another edge's draft (a resumed session
            # whose first edge was still alive): take the committed tokens as they are.
            log.warning("verdict_for_another_draft", sid=s.sid, round=result.round)
            await self.drafter.resync(s.sid, s.committed + list(result.new_tokens))

    def budget_ms(self, s: EdgeSession, k: int, draft_ms: float) -> float:
        """What the edge can still wait for this round's result: the first token is bound by
        the TTFT SLO from the session's start; a later round of k drafted tokens may spend
        (k + 1)·TPOT, less its drafting and the uplink."""
        slo = s.spec.slo
        if slo is None:
            return NO_SLO_BUDGET_MS
        if not s.output:
            return slo.ttft_ms - (self.clock() - s.started_s) * 1e3
        return (k + 1) * slo.tpot_ms - draft_ms - self.verifier.uplink_ms

    def done(self, s: EdgeSession, error: WispError | None = None) -> GenerateDone:
        """The stream's last message, with the request's timings."""
        end = self.clock()
        n = len(s.output)
        first = s.first_token_s
        ttft_ms = ((first if first is not None else end) - s.started_s) * 1e3
        tpot_ms = (end - first) * 1e3 / (n - 1) if first is not None and n > 1 else 0.0
        if error is not None:
            reason = "error"
        elif n >= s.spec.max_new_tokens:
            reason = "length"
        else:
            reason = "eos"
        return GenerateDone(
            sid=s.sid, finish_reason=reason, num_tokens=n,
            timings=GenerateTimings(ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                                    e2e_ms=(end - s.started_s) * 1e3),
            stats=s.stats,
            error=None if error is None else ErrorInfo.of(error))

    @staticmethod
    def request_event(s: EdgeSession, done: GenerateDone) -> RequestEvent:
        return RequestEvent(ts_ms=time.time() * 1e3, sid=s.sid, mode=s.spec.mode,
                            num_tokens=done.num_tokens, timings=done.timings, slo=s.spec.slo,
                            stats=done.stats, finish_reason=done.finish_reason)
