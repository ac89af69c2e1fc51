"""The deadline-aware batch policies: ``edf`` (earliest deadline first) and ``wisp`` (WISP's
SLO-aware scheduler, Mechanism 2). docs/scheduler.md explains both and their numbers.

Both keep the rules of `batching` (a subset of the queue, one entry per session, the size, token
and KV caps, the starvation count) through one `_Batch` being filled. The wisp policy adds time:
under the verifier's latency estimator T̂ (DESIGN.md §6) every entry has a latest start time
``LST = deadline − T̂(entry alone) − δ``, and an entry joins a batch only while every included
entry that can still meet its deadline keeps meeting it.

The estimator is affine in the batch shape's columns, so a batch's T̂ is ``c`` plus a sum of
per-entry marginal costs: the feasibility check keeps that running sum and the smallest slack
of the included entries, one comparison per candidate instead of a T̂ of the batch so far.
Candidate scans are bounded (`SCAN_FACTOR` × ``max_batch_size`` per phase), so select() costs
O(n) for the per-entry pass plus a bounded remainder: well under a millisecond for a thousand
queued entries (``wisp bench scheduler``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from services.admission_scheduler.batching import (
    POLICIES,
    BatchPolicy,
    PendingVerify,
    Selection,
    VerifierState,
    entry_kv_claim,
    finish,
)

__all__ = ["SCAN_FACTOR", "STARVATION_LOOKAHEAD", "EDFPolicy", "WispPolicy"]

# Candidates a phase examines, as a multiple of max_batch_size: enough to skip over entries that
# do not fit (a second round of a sid, a prefill over the token or KV room) without an O(n) scan.
SCAN_FACTOR = 4
# Batches ahead the starvation bound plans for: an entry this close to the bound goes now when
# the entries closer still would leave it no room in the batches left to it (two large
# prefills reaching the bound together cannot share one KV budget).
STARVATION_LOOKAHEAD = 3
_INF = math.inf
_MIN_COST_MS = 1e-6  # a marginal cost of 0 (an estimator without per-token terms) is no density
_COST = itemgetter(2)  # of a (key, index, marginal cost) candidate
_T = TypeVar("_T")


class _Batch:
    """A batch being filled: the caps (size, Σ draft+1 tokens with the first entry always
    allowed, Σ KV claim within the budget with a lone over-budget entry only on an idle
    verifier, one entry per sid) and, for wisp, its predicted time less ``c`` (``cost``) and the
    slacks (same units) of the included entries that still meet their deadline, smallest
    first."""

    __slots__ = ("block_size", "budget", "claimed", "closed", "cost", "entries", "idle",
                 "max_size", "max_tokens", "sids", "slacks", "tokens")

    def __init__(self, max_size: int, max_tokens: int, verifier: VerifierState,
                 idle: bool | None = None):
        self.max_size, self.max_tokens = max_size, max_tokens
        self.budget = verifier.kv_budget_blocks
        self.block_size = verifier.block_size
        self.idle = verifier.batches_in_flight == 0 if idle is None else idle
        self.entries: list[PendingVerify] = []
        self.sids: set[str] = set()
        self.tokens = self.claimed = 0
        self.closed = False  # a lone over-budget entry: nothing may join it
        self.cost = 0.0
        self.slacks: list[float] = []  # a heap

    def full(self) -> bool:
        return self.closed or len(self.entries) >= self.max_size

    def add(self, entry: PendingVerify, cost: float = 0.0, slack: float = _INF,
            force: bool = False) -> bool:
        """Add `entry` if the caps allow and (unless `force`) the new cost keeps every
        constraining entry within its slack; `entry` constrains from now on if it meets its own
        `slack`. A forced entry that pushes others past their slack releases them."""
        if self.closed or len(self.entries) >= self.max_size:
            return False
        total = self.cost + cost
        slacks = self.slacks
        if slacks and total > slacks[0] and not force:
            return False
        sid = entry.sid
        if sid in self.sids:
            return False
        tokens = len(entry.request.draft_ids) + 1
        if self.entries and self.tokens + tokens > self.max_tokens:
            return False
        if self.budget is not None:
            claim = entry_kv_claim(entry, self.block_size)
            if self.claimed + claim > self.budget:
                if self.entries or not self.idle or claim <= self.budget:
                    return False
                self.closed = True  # over the budget alone: the verifier evicts or refuses
            self.claimed += claim
        self.entries.append(entry)
        self.sids.add(sid)
        self.tokens += tokens
        self.cost = total
        while slacks and slacks[0] < total:  # only after a forced add
            heapq.heappop(slacks)
        if total <= slack < _INF:
            heapq.heappush(slacks, slack)
        return True

    def fallback(self, queue: Sequence[PendingVerify]) -> None:
        """Work conservation: an idle verifier with a queue gets a batch even when the bounded
        scans found nothing (the oldest entry always fits an empty batch on an idle verifier)."""
        if not self.entries and self.idle and queue:
            self.add(queue[0])


def _due_now(queue: Sequence[PendingVerify], aged: list[tuple[int, int]], bound: int,
             max_size: int, max_tokens: int, verifier: VerifierState) -> list[int]:
    """Which of the `aged` entries ((-passes, index in `queue`) of those within
    `STARVATION_LOOKAHEAD` passes of `bound`) must go in this batch for none to be passed over
    more than `bound` times: each, most passed over (then oldest) first, takes the latest of the
    batches left to it (0 = this one) that still has room under the caps and the current KV
    budget; those that land in this one are due now, in that order."""
    plan = [_Batch(max_size, max_tokens, verifier, idle=True if j else None)
            for j in range(STARVATION_LOOKAHEAD + 1)]
    due = []
    for minus_passes, i in _cheapest(aged, SCAN_FACTOR * max_size):
        if plan[0].full():
            break  # what else would land here cannot go in this batch anyway
        entry = queue[i]
        latest = min(STARVATION_LOOKAHEAD, bound + minus_passes)
        if not any(plan[j].add(entry) for j in range(latest, 0, -1)):
            plan[0].add(entry)  # if even this one has no room, it goes first anyway
            due.append(i)
    return due


class EDFPolicy(BatchPolicy):
    """Earliest deadline first under FCFS's caps and the KV budget: the entries due under the
    starvation bound first (`_due_now`), then by deadline (ties: arrival); an entry that does
    not fit is skipped and a later, smaller one may take its place."""

    name = "edf"

    def __init__(self, max_batch_size: int = 32, max_batch_tokens: int = 8192,
                 starvation_passes: int = 8):
        if max_batch_size < 1 or max_batch_tokens < 1 or starvation_passes < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}), max_batch_tokens "
                             f"({max_batch_tokens}) and starvation_passes ({starvation_passes}) "
                             "must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.starvation_passes = starvation_passes

    @classmethod
    def from_config(cls, config: Any) -> EDFPolicy:
        return cls(max_batch_size=config.max_batch_size,
                   max_batch_tokens=config.max_batch_tokens,
                   starvation_passes=getattr(config, "starvation_passes", 8))

    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> Selection:
        batch = _Batch(self.max_batch_size, self.max_batch_tokens, verifier)
        bound = self.starvation_passes
        aging = max(0, bound - STARVATION_LOOKAHEAD)
        aged = [(-e.passes, i) for i, e in enumerate(queue) if e.passes >= aging]
        for i in _due_now(queue, aged, bound, self.max_batch_size, self.max_batch_tokens,
                          verifier) if aged else ():
            if batch.full():
                break
            batch.add(queue[i])
        if not batch.full():
            limit = SCAN_FACTOR * self.max_batch_size
            by_deadline = [(e.deadline_ms, i) for i, e in enumerate(queue)]
            for _, i in _cheapest(by_deadline, limit):
                if batch.add(queue[i]) and batch.full():
                    break
        batch.fallback(queue)
        return finish(queue, batch.entries, now_ms, verifier)


class WispPolicy(EDFPolicy):
    """WISP's SLO-aware batching (Mechanism 2) under the latency estimator T̂ and guard δ.

    With ``start`` the time the batch can start (now, or after the batches in flight) and
    ``T_ref`` the predicted time of the verifier's last batch (the next dispatch opportunity is
    about ``start + T_ref``; with no batch done yet, ``c``), each entry has a marginal cost
    ``m`` (T̂ of the batch with it less T̂ without it) and ``LST = deadline − (c + m) − δ``.
    It is *late* if ``LST < now`` (it misses its deadline even alone, now) and *urgent* if
    ``LST < start + T_ref`` (it misses unless it goes in this batch). The batch takes, under
    the caps (size, tokens, KV budget, one entry per sid):

    a. the entries due under the starvation bound (`_due_now`), whatever their deadlines;
    b. urgent entries by deadline, each only if the batch with it still meets the deadline of
       every included entry that was meeting its own and of the entry itself (one that cannot
       is lost for this round and joins the late ones);
    c. the rest by utility per marginal millisecond (a greedy knapsack), under the same check:
       utility = positions verified (draft + 1, what the round can commit: the drafter already
       stopped where it expected rejection) × urgency weight ``1 + T_ref / (LST − start)``
       (1 for a far deadline, 2 for one about to become urgent);
    d. late and lost entries by deadline in what room is left, constraining nobody: served,
       never dropped, but never at the cost of an entry that can still make it. An entry of
       (c) whose own deadline this batch already overruns (a forced prefill ahead of it) is
       lost too: the next batch starts after this one, so waiting would only make it later.

    It never holds back an entry it could send, so an idle verifier with a queue always gets
    a batch, and it needs no wake-up. Without an estimator it is `EDFPolicy`.
    """

    name = "wisp"

    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> Selection:
        if verifier.estimator is None or not queue:
            return super().select(queue, now_ms, verifier)
        est = verifier.estimator
        a, b, r, c = est.a, est.b_compute, est.b_read, est.c
        t_ref = c
        if verifier.recent_done:
            last = verifier.recent_done[-1]
            t_ref = max(c, c + a * last.num_linear + b * last.num_interactions
                        + r * last.num_cached)
        start = now_ms + verifier.batches_in_flight * t_ref
        horizon = start + t_ref
        offset = c + verifier.guard_ms  # LST = deadline - m - offset
        aging = max(0, self.starvation_passes - STARVATION_LOOKAHEAD)

        # One pass over the queue, the only O(n) work besides the starvation count: each
        # entry's marginal cost m and LST, and its phase. Hot: locals and no calls.
        aged: list[tuple[int, int]] = []  # (-passes, index): near or at the bound
        urgent: list[tuple[float, int, float]] = []  # (deadline, index, m)
        late: list[tuple[float, int, float]] = []  # (deadline, index, m)
        rest: list[tuple[float, int, float]] = []  # (ms per utility, index, m)
        add_urgent, add_late, add_rest = urgent.append, late.append, rest.append
        i = -1
        for e in queue:
            i += 1
            n = e.num_new
            k = e.num_cached
            m = (a + b * (n + k)) * n + r * k
            d = e.deadline_ms
            lst = d - m - offset
            if e.passes >= aging:
                aged.append((-e.passes, i))
            if lst >= horizon:
                # utility = (draft + 1) × (1 + T_ref / (LST - start)); key = m / utility
                slack = lst - start
                add_rest(((m + _MIN_COST_MS) * slack
                          / ((len(e.request.draft_ids) + 1) * (slack + t_ref)), i, m))
            elif lst >= start:
                add_urgent((d, i, m))
            else:
                add_late((d, i, m))

        # An entry meets its deadline in the batch iff c + Σm + δ <= deadline - start, i.e.
        # batch.cost <= its slack = deadline - start - offset = LST + m - start.
        batch = _Batch(self.max_batch_size, self.max_batch_tokens, verifier)
        base = start + offset
        for i in _due_now(queue, aged, self.starvation_passes, self.max_batch_size,
                          self.max_batch_tokens, verifier) if aged else ():
            if batch.full():
                break
            e = queue[i]
            n, k = e.num_new, e.num_cached
            m = (a + b * (n + k)) * n + r * k
            batch.add(e, m, e.deadline_ms - base, force=True)
        limit = SCAN_FACTOR * self.max_batch_size
        lost: list[tuple[float, int, float]] = []
        if urgent and not batch.full():
            for item in _cheapest(urgent, limit):
                d, i, m = item
                slack = d - base
                if batch.cost + m > slack:
                    lost.append(item)  # too late with what is already in: like a late one
                elif batch.add(queue[i], m, slack) and batch.full():
                    break
        slacks = batch.slacks
        if rest and not batch.full():
            floor = min(rest, key=_COST)[2]
            for _, i, m in _cheapest(rest, limit):
                if slacks and slacks[0] - batch.cost < floor:
                    break  # no time left for any of them
                slack = queue[i].deadline_ms - base
                if batch.cost + m > slack:
                    # Not urgent, yet this batch (a forced prefill, say) already runs past it:
                    # it would miss waiting for the next one too, so it rides along as a late
                    # one rather than wait a whole batch more.
                    lost.append((queue[i].deadline_ms, i, m))
                elif batch.add(queue[i], m, slack) and batch.full():
                    break
        late += lost
        if late and not batch.full():
            floor = min(late, key=_COST)[2]
            for _, i, m in _cheapest(late, limit):
                if slacks and slacks[0] - batch.cost < floor:
                    break
                if batch.add(queue[i], m) and batch.full():
                    break
        batch.fallback(queue)
        return finish(queue, batch.entries, now_ms, verifier)


def _cheapest(items: list[_T], limit: int) -> Iterator[_T]:
    """Up to `limit` of `items` in increasing order, popped lazily from `items` made a heap
    (O(n) once, then O(log n) per item taken: most scans stop after a few)."""
    heapq.heapify(items)
    for _ in range(min(limit, len(items))):
        yield heapq.heappop(items)


POLICIES.update({EDFPolicy.name: EDFPolicy, WispPolicy.name: WispPolicy})
