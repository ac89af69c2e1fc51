"""Admission control: may one more session join a verifier without pushing the sessions already
there past their SLOs? Pure Python, no NATS or Redis: the scheduler hands in what it knows of
the verifier's sessions and of the candidate, with the verifier's latency estimator, and gets an
`AdmissionDecision` back (admit or refuse, why, and when to try again).

Model (WISP's estimator, DESIGN.md §6, under Little's law, papers/sd_latency_model_abstract.txt)

* **Load.** Each session has at most one round outstanding (one edge loop drives a session) and
  a batch holds at most one round per session, so no batch is larger than `B_all`, the batch of
  one round of every session. A round that arrives while the verifier runs the `m` batches the
  scheduler keeps in flight (its `max_batches_in_flight`) waits for them, then runs in the next
  batch; with T̂ growing in every term of the batch shape, its server time is bounded by

      W = (m + 1) · T̂(B_all) + δ          (δ: the estimator's guard, a quantile of its error)

* **Why the bound is the operating point, not a loose worst case.** By Little's law the verifier
  holds L = λ·W rounds, with λ = n / (e + W) rounds per ms for n sessions whose edge side
  (drafting, network) takes e: the mean batch is L = n·W / (e + W). L tends to n as W grows past
  e, i.e. exactly when the verifier is the bottleneck, the only regime in which admission
  refuses anybody; when the edges are the bottleneck the bound overstates the batch by the share
  of sessions drafting at a time, and the session fits anyway. The wait for the batch in flight
  is charged whole, not its mean half: devices of different speeds drift out of phase, so rounds
  land anywhere in the batch in flight, and SLO attainment is decided per request by the slow
  side of the wait, not its mean. In the paper's terms the per-batch constant `c` is the
  load-independent demand (paid by each of the m + 1 batches) and the per-token terms the
  load-dependent one (paid for all n sessions in each).

* **Shape of a round.** A warm round of a session drafting k tokens feeds k + 1 positions (its
  last committed token and the draft) and reads its cached context. The context taken is the
  midpoint of what remains of the session (context + remaining / 2): TPOT is a mean over a
  request's rounds, so the mean context over its remaining rounds is what its TPOT sees. The
  candidate counts likewise from its prompt (prompt + max_new_tokens / 2).

* **Budgets.** A session with TPOT SLO τ drafting k tokens may spend (k + 1)·τ on a round; its
  edge sends what drafting and the uplink left of it (`VerifyRequest.budget_ms`), and the
  server's part is that less the scheduler's downlink estimate: the caller's
  `server_budget_ms`. Before a session has one (and for the candidate) its nominal part is
  `server_share · (k + 1) · τ`. Admission refuses when W with the candidate exceeds the
  tightest budget among the SLO sessions, the candidate's included. A session whose SLO no load
  could meet (its budget is under T̂ of its own round alone + δ) constrains nothing: refusing
  others cannot help it, and letting it count would close the verifier to everyone.

* **First token.** The candidate's first round is a cold prefill (prompt + k fed, nothing
  cached) in a batch with every admitted session's warm round, after the batches in flight:
  W₀ = m · T̂(B_admitted) + T̂(B_admitted + prefill) + δ must fit `server_share · TTFT`. The
  prefill slows the others' rounds once; a mean over their rounds absorbs it, so it is not
  charged to them.

* Sessions without an SLO add load and constrain nothing; the hard cap
  (`max_sessions_per_verifier`) applies whatever the estimate; without an estimator (no
  verifier has reported one yet) only the cap decides.

* **Retry after.** Capacity frees when an admitted session finishes: the soonest expected
  finish is min over sessions of ⌈remaining / tokens per round⌉ · W_now (W at the current load),
  clamped to [100 ms, 60 s] so that a client neither spins nor gives up. W_now leaves the edge
  side of a round out, so the hint errs early (a retry is one cheap open) rather than late.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from common.engine.estimator import BatchShape
from common.protocol import SERVER_MODES, AdmissionEvent, SessionOpen, Slo
from services.admission_scheduler.sessions import SessionEntry

__all__ = [
    "DEFAULT_RETRY_AFTER_MS",
    "DEFAULT_SERVER_SHARE",
    "MAX_RETRY_AFTER_MS",
    "MIN_RETRY_AFTER_MS",
    "AdmissionController",
    "AdmissionDecision",
    "AdmittedSession",
    "Candidate",
    "Predictor",
]

MIN_RETRY_AFTER_MS = 100.0
MAX_RETRY_AFTER_MS = 60_000.0
# When nothing tells how fast the admitted sessions progress (no estimator, no SLO to go by).
DEFAULT_RETRY_AFTER_MS = 1_000.0
# Share of an SLO's per-round time (and of its TTFT) assumed left for the server before a
# session's own budgets are observed: drafting k tokens and two network legs take the rest.
DEFAULT_SERVER_SHARE = 0.5


class Predictor(Protocol):
    """A batch-latency estimator: `LatencyEstimator` or `OnlineEstimator`."""

    def predict(self, shape: BatchShape) -> float: ...


@dataclass(slots=True, frozen=True)
class AdmittedSession:
    """A session already on the verifier, as admission weighs it."""

    k: int  # draft tokens per round: its k_max (0 for a session that does not draft)
    context_len: int  # committed tokens (what its rounds read from the KV cache)
    remaining_tokens: int  # output tokens it may still produce
    slo: Slo | None = None
    # Its last round's VerifyRequest.budget_ms less the downlink estimate (rounds after the
    # first: the first one's budget is what the TTFT left). None: not observed yet.
    server_budget_ms: float | None = None
    tokens_per_round: float | None = None  # committed per round, observed; None: unknown
    server_share: float | None = None  # None: the controller's (1.0 suits server-side modes)
    sid: str = ""  # for the reason only

    @classmethod
    def of(cls, e: SessionEntry) -> AdmittedSession | None:
        """What the scheduler's session table knows of a session; None for one that asks for
        no more rounds (finished, not yet closed) or whose spec it has not learned."""
        if e.spec is None:
            return None
        remaining = e.spec.max_new_tokens - (e.committed_len - e.prompt_len)
        if remaining <= 0:
            return None
        return cls(k=e.spec.k_max, context_len=e.committed_len, remaining_tokens=remaining,
                   slo=e.spec.slo, server_budget_ms=e.server_budget_ms,
                   tokens_per_round=e.tokens_per_round or None,
                   server_share=1.0 if e.spec.mode in SERVER_MODES else None, sid=e.sid)

    def row(self) -> tuple[int, int]:
        """(tokens fed, tokens cached) of one warm round, at the midpoint of what remains."""
        return self.k + 1, self.context_len + self.remaining_tokens // 2


@dataclass(slots=True, frozen=True)
class Candidate:
    """The session asking to be admitted."""

    prompt_len: int
    k: int  # its k_max (0 for a session that does not draft)
    max_new_tokens: int
    slo: Slo | None = None
    server_share: float | None = None  # None: the controller's

    @classmethod
    def of(cls, req: SessionOpen) -> Candidate:
        spec = req.spec
        return cls(prompt_len=len(req.prompt_ids), k=spec.k_max,
                   max_new_tokens=spec.max_new_tokens, slo=spec.slo,
                   server_share=1.0 if spec.mode in SERVER_MODES else None)

    def row(self) -> tuple[int, int]:
        return self.k + 1, self.prompt_len + self.max_new_tokens // 2

    def prefill_row(self) -> tuple[int, int]:
        """Its first round: the whole prompt and the draft fed, nothing cached."""
        return self.prompt_len + self.k, 0


@dataclass(slots=True, frozen=True)
class AdmissionDecision:
    admit: bool
    reason: str  # for logs and the overloaded error's message
    predicted_round_ms: float = 0.0  # W with the candidate in (0: no estimator)
    budget_ms: float | None = None  # the tightest server budget that W had to fit (None: none)
    retry_after_ms: float = 0.0  # refused: when capacity is expected to free (0 when admitted)
    prefill_ms: float = 0.0  # W₀, the candidate's first round (0: not predicted)

    def event(self, *, sid: str, ts_ms: float, verifier_id: str | None = None,
              outcome: Literal["admitted", "queued", "refused"] | None = None
              ) -> AdmissionEvent:
        """The `admission` event of this decision (outcome: "admitted" or "refused" by the
        decision, unless the caller queued it)."""
        return AdmissionEvent(
            ts_ms=ts_ms, sid=sid, outcome=outcome or ("admitted" if self.admit else "refused"),
            verifier_id=verifier_id, predicted_round_ms=self.predicted_round_ms,
            budget_ms=self.budget_ms or 0.0, retry_after_ms=self.retry_after_ms)


@dataclass(slots=True, frozen=True)
class AdmissionController:
    """Decides session opens for one verifier at a time (see the module docstring).

    `server_share`: share of an SLO's per-round time (k + 1)·TPOT, and of its TTFT, taken as
    the server's before a session's own budget is observed; `max_sessions_per_verifier`: a hard
    cap, 0 for none; `batches_in_flight`: the scheduler's max_batches_in_flight (a round may
    wait behind that many batches)."""

    server_share: float = DEFAULT_SERVER_SHARE
    max_sessions_per_verifier: int = 0
    batches_in_flight: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.server_share <= 1.0:
            raise ValueError(f"server_share must be within (0, 1], got {self.server_share!r}")
        if self.max_sessions_per_verifier < 0:
            raise ValueError(f"max_sessions_per_verifier must be >= 0, got "
                             f"{self.max_sessions_per_verifier}")
        if self.batches_in_flight < 1:
            raise ValueError(f"batches_in_flight must be >= 1, got {self.batches_in_flight}")

    # -- the decision ---------------------------------------------------------------------------
    def decide(self, candidate: Candidate, admitted: Sequence[AdmittedSession],
               estimator: Predictor | None, guard_ms: float = 0.0) -> AdmissionDecision:
        """Admit `candidate` next to `admitted` (the verifier's sessions) or not."""
        n = len(admitted) + 1  # sessions with the candidate in
        cap = self.max_sessions_per_verifier
        if cap and len(admitted) >= cap:
            return AdmissionDecision(
                admit=False, reason=f"the verifier holds {len(admitted)} sessions, its cap "
                f"(max_sessions_per_verifier = {cap})",
                retry_after_ms=self.retry_after_ms(admitted, estimator, guard_ms))
        if estimator is None:
            return AdmissionDecision(admit=True, reason="no latency estimate for the verifier "
                                     "yet: admitted on the session cap alone")
        guard_ms = max(0.0, guard_ms)
        rows = [s.row() for s in admitted]
        round_ms = self.round_ms(rows + [candidate.row()], estimator, guard_ms)
        budget, whose = self._tightest_budget(candidate, admitted, estimator, guard_ms)
        if budget is not None and round_ms > budget:
            return AdmissionDecision(
                admit=False, reason=f"predicted {round_ms:.0f} ms per round with {n} sessions "
                f"exceeds the tightest budget {budget:.0f} ms ({whose})",
                predicted_round_ms=round_ms, budget_ms=budget,
                retry_after_ms=self.retry_after_ms(admitted, estimator, guard_ms))
        prefill_ms, ttft_budget, ttft_attainable = self._prefill(candidate, rows, estimator,
                                                                 guard_ms)
        if ttft_attainable and prefill_ms > ttft_budget:
            return AdmissionDecision(
                admit=False, reason=f"predicted first round {prefill_ms:.0f} ms (a "
                f"{candidate.prompt_len}-token prompt next to {len(admitted)} sessions) exceeds "
                f"the TTFT budget {ttft_budget:.0f} ms",
                predicted_round_ms=round_ms, budget_ms=budget, prefill_ms=prefill_ms,
                retry_after_ms=self.retry_after_ms(admitted, estimator, guard_ms))
        if budget is None:
            reason = (f"no session with an attainable SLO to protect (predicted "
                      f"{round_ms:.0f} ms per round with {n} sessions)")
        else:
            reason = (f"predicted {round_ms:.0f} ms per round with {n} sessions fits the "
                      f"tightest budget {budget:.0f} ms ({whose})")
        if candidate.slo is not None and not self._candidate_attainable(
                candidate, estimator, guard_ms):
            reason += "; the session's own SLO is out of reach on this verifier even alone"
        return AdmissionDecision(admit=True, reason=reason, predicted_round_ms=round_ms,
                                 budget_ms=budget, prefill_ms=prefill_ms)

    def round_ms(self, rows: list[tuple[int, int]], estimator: Predictor,
                 guard_ms: float = 0.0) -> float:
        """W: the server time of a round among the sessions of `rows` ((fed, cached) each):
        the batches in flight, then its own, all of them full, plus the guard."""
        if not rows:
            return 0.0
        return (self.batches_in_flight + 1) * estimator.predict(BatchShape.of(rows)) + guard_ms

    @staticmethod
    def round_ms_alone(row: tuple[int, int], estimator: Predictor, guard_ms: float) -> float:
        """A round with nothing else on the verifier: the least any load allows."""
        return estimator.predict(BatchShape.of([row])) + guard_ms

    def retry_after_ms(self, admitted: Sequence[AdmittedSession], estimator: Predictor | None,
                       guard_ms: float = 0.0) -> float:
        """When capacity is expected to free: the soonest expected finish among `admitted`,
        clamped to [MIN_RETRY_AFTER_MS, MAX_RETRY_AFTER_MS]. Rounds take W at the current
        load; without an estimator a session with an SLO is taken to run at its TPOT, and with
        nothing to go by the answer is DEFAULT_RETRY_AFTER_MS."""
        round_ms = (self.round_ms([s.row() for s in admitted], estimator, max(0.0, guard_ms))
                    if estimator is not None else None)
        soonest = math.inf
        for s in admitted:
            if round_ms is not None:
                # Unknown: the most a round can commit, so that the hint errs early.
                per_round = (s.tokens_per_round if s.tokens_per_round is not None
                             else float(s.k + 1))
                finish = math.ceil(s.remaining_tokens / max(per_round, 1.0)) * round_ms
            elif s.slo is not None:
                finish = s.remaining_tokens * s.slo.tpot_ms
            else:
                continue
            soonest = min(soonest, finish)
        if math.isinf(soonest):
            return DEFAULT_RETRY_AFTER_MS
        return min(MAX_RETRY_AFTER_MS, max(MIN_RETRY_AFTER_MS, soonest))

    # -- parts ----------------------------------------------------------------------------------
    def _share(self, share: float | None) -> float:
        return self.server_share if share is None else share

    def _budget(self, s: AdmittedSession) -> float | None:
        if s.slo is None:
            return None
        if s.server_budget_ms is not None:
            return s.server_budget_ms
        return self._share(s.server_share) * (s.k + 1) * s.slo.tpot_ms

    def _tightest_budget(self, candidate: Candidate, admitted: Sequence[AdmittedSession],
                         estimator: Predictor, guard_ms: float) -> tuple[float | None, str]:
        """The smallest attainable server budget per round, and whose it is."""
        best: tuple[float | None, str] = (None, "")
        for s in admitted:
            budget = self._budget(s)
            if budget is None or budget < self.round_ms_alone(s.row(), estimator, guard_ms):
                continue
            if best[0] is None or budget < best[0]:
                best = (budget, f"session {s.sid}" if s.sid else "an admitted session")
        if candidate.slo is not None and self._candidate_attainable(candidate, estimator,
                                                                    guard_ms):
            budget = self._nominal(candidate)
            if best[0] is None or budget < best[0]:
                best = (budget, "the new session's")
        return best

    def _nominal(self, candidate: Candidate) -> float:
        assert candidate.slo is not None
        return self._share(candidate.server_share) * (candidate.k + 1) * candidate.slo.tpot_ms

    def _candidate_attainable(self, candidate: Candidate, estimator: Predictor,
                              guard_ms: float) -> bool:
        return self._nominal(candidate) >= self.round_ms_alone(candidate.row(), estimator,
                                                               guard_ms)

    def _prefill(self, candidate: Candidate, rows: list[tuple[int, int]],
                 estimator: Predictor, guard_ms: float) -> tuple[float, float, bool]:
        """(W₀, the TTFT budget, whether any load could meet it); W₀ is 0 without a TTFT
        SLO."""
        if candidate.slo is None:
            return 0.0, 0.0, False
        budget = self._share(candidate.server_share) * candidate.slo.ttft_ms
        cold = candidate.prefill_row()
        in_flight = self.batches_in_flight * estimator.predict(BatchShape.of(rows)) if rows \
            else 0.0
        prefill = in_flight + estimator.predict(BatchShape.of(rows + [cold])) + guard_ms
        return prefill, budget, self.round_ms_alone(cold, estimator, guard_ms) <= budget
