"""The scheduler's view of the verifiers: liveness, session placement, queues, in-flight batches.

Pure Python, no NATS or Redis: the service feeds it heartbeats, submits and `done`s with the
current time and writes the placements it returns to Redis. All times are the scheduler's wall
clock in ms (the same clock as request deadlines). Sessions live in a `SessionTable`.

* A verifier is *live* from its first heartbeat until it is silent for `heartbeat_timeout_s` or
  a batch of it is not done within `batch_timeout_s`; then it is declared dead: its sessions are
  spread over the live verifiers that can serve them (fewest sessions first) and its queued and
  in-flight entries follow them. Re-running an in-flight entry elsewhere is safe: rounds are
  idempotent per (sid, round) through Redis.
* A verifier declared dead for a hung batch is not revived by its heartbeats (they come from
  its event loop, which may be fine while its worker is stuck) until those batches' `done`s
  arrive or another `batch_timeout_s` has passed; one declared dead for silence is revived by
  its next heartbeat (a restarted process that kept its id).
* Entries that cannot be placed (no live verifier) wait in `orphans` until one appears; the
  service answers those waiting longer than `batch_timeout_s` with a capacity error.
* A verifier runs up to the service's `max_batches_in_flight` batches at once (it queues them);
  its queue is in arrival order, and a retry of a queued (sid, round) replaces the queued one
  (new reply inbox and deadline) in its place.
* A verifier whose heartbeat advertises `ModelLimits` only gets sessions it can serve (same
  vocabulary, k_max and context large enough).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.engine.estimator import BatchShape, LatencyEstimator, OnlineEstimator
from common.limits import mismatch
from common.protocol import BatchDone, EstimatorCoefficients, Heartbeat, ModelLimits
from services.admission_scheduler.batching import PendingVerify, VerifierState
from services.admission_scheduler.sessions import SessionEntry, SessionTable

__all__ = ["DONE_HISTORY", "Death", "InFlightBatch", "VerifierInfo", "VerifierRegistry"]

DONE_HISTORY = 64  # BatchDone messages kept per verifier (estimator feedback)


@dataclass(slots=True)
class InFlightBatch:
    batch_id: str
    entries: list[PendingVerify]
    started_ms: float
    predicted_ms: float = 0.0  # T̂ when it was formed (0: no estimator)
    guard_ms: float = 0.0
    decision_ms: float = 0.0  # the policy's select() time
    late: int = 0  # entries already past their latest start time when it was formed
    policy: str = ""  # the batch policy that formed it
    kv_claim: int = 0  # KV blocks its entries claim beyond what they held


@dataclass(slots=True)
class VerifierInfo:
    verifier_id: str
    last_seen_ms: float
    model: str = ""
    hardware: str = ""
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 1
    limits: ModelLimits | None = None
    reported_sessions: int = 0  # sessions the verifier holds KV for, by its own count
    alive: bool = True
    dead_since_ms: float = 0.0
    stuck_batch_ids: set[str] = field(default_factory=set)  # in flight when declared dead
    queue: list[PendingVerify] = field(default_factory=list)
    in_flight: dict[str, InFlightBatch] = field(default_factory=dict)  # by batch id, oldest first
    recent_done: deque[BatchDone] = field(default_factory=lambda: deque(maxlen=DONE_HISTORY))
    # Its latency estimator: the coefficients it advertises, refined from its batch times.
    advertised: EstimatorCoefficients | None = None
    estimator: OnlineEstimator | None = None

    def can_serve(self, entry: SessionEntry | None) -> bool:
        if entry is None or entry.spec is None or self.limits is None:
            return True
        return mismatch(entry.spec, entry.prompt_len, entry.vocab, self.limits) is None


@dataclass(slots=True)
class Death:
    """What declaring a verifier dead changed."""

    verifier_id: str
    reason: str  # "heartbeat" | "batch_timeout"
    moved_sessions: dict[str, str]  # sid -> its new verifier (to write to Redis)
    num_requeued: int  # entries now queued at live verifiers
    num_orphaned: int  # entries waiting for a live verifier


class VerifierRegistry:
    def __init__(self, heartbeat_timeout_s: float = 3.0, batch_timeout_s: float = 30.0,
                 now_ms: float = 0.0, guard_quantile: float = 0.9):
        self.guard_quantile = guard_quantile
        self.heartbeat_timeout_ms = heartbeat_timeout_s * 1e3
        self.batch_timeout_ms = batch_timeout_s * 1e3
        self.started_ms = now_ms
        self.verifiers: dict[str, VerifierInfo] = {}
        self.sessions = SessionTable()
        self.orphans: list[PendingVerify] = []  # no live verifier to queue them at yet

    # -- liveness ---------------------------------------------------------------------------
    def heartbeat(self, hb: Heartbeat, now_ms: float) -> bool:
        """Record a heartbeat; True when the verifier (re)joins the live set."""
        v = self.verifiers.get(hb.verifier_id)
        joined = False
        if v is None:
            v = self.verifiers[hb.verifier_id] = VerifierInfo(hb.verifier_id, now_ms)
            joined = True
        elif not v.alive and (not v.stuck_batch_ids
                              or now_ms - v.dead_since_ms >= self.batch_timeout_ms):
            v.alive = True
            v.stuck_batch_ids.clear()
            joined = True
        v.last_seen_ms = now_ms
        v.model, v.hardware = hb.model, hb.hardware
        v.free_blocks, v.total_blocks = hb.free_blocks, hb.total_blocks
        v.block_size, v.limits = hb.block_size, hb.limits
        v.reported_sessions = hb.num_sessions
        if hb.estimator is not None and hb.estimator != v.advertised:
            # A (re)started verifier with new coefficients: refine from them afresh.
            v.advertised = hb.estimator
            v.estimator = OnlineEstimator(
                LatencyEstimator(hb.estimator.a, hb.estimator.b_compute, hb.estimator.b_read,
                                 hb.estimator.c), guard_quantile=self.guard_quantile)
        return joined

    def state(self, vid: str) -> VerifierState:
        """What `vid`'s batch policy may know of it now."""
        v = self.verifiers[vid]
        est = v.estimator
        return VerifierState(verifier_id=vid, model=v.model, hardware=v.hardware,
                             free_blocks=v.free_blocks, total_blocks=v.total_blocks,
                             block_size=v.block_size, limits=v.limits,
                             batches_in_flight=len(v.in_flight),
                             recent_done=tuple(v.recent_done),
                             estimator=est.current if est is not None else None,
                             guard_ms=est.guard_ms if est is not None else 0.0,
                             kv_budget_blocks=self.kv_budget(vid))

    def kv_budget(self, vid: str) -> int | None:
        """KV blocks a new batch of `vid` may claim: its free blocks (last heartbeat), plus
        those of its sessions with nothing queued or in flight (the verifier evicts those, least
        recently used first), less what its batches in flight claim. None when it reports no
        block counts (a runner without a paged cache)."""
        v = self.verifiers[vid]
        if v.total_blocks <= 0:
            return None
        busy = {e.sid for e in v.queue}
        busy.update(e.sid for b in v.in_flight.values() for e in b.entries)
        idle = self.sessions.cached_blocks(vid, v.block_size, busy)
        claimed = sum(b.kv_claim for b in v.in_flight.values())
        return max(0, v.free_blocks + idle - claimed)

    def is_alive(self, vid: str) -> bool:
        v = self.verifiers.get(vid)
        return v is not None and v.alive

    def live_ids(self) -> list[str]:
        return [vid for vid, v in self.verifiers.items() if v.alive]

    def timed_out(self, now_ms: float) -> list[tuple[str, str]]:
        """Live verifiers that should be declared dead, with the reason."""
        out = []
        for vid, v in self.verifiers.items():
            if not v.alive:
                continue
            if now_ms - v.last_seen_ms > self.heartbeat_timeout_ms:
                out.append((vid, "heartbeat"))
            elif v.in_flight and now_ms - min(b.started_ms for b in v.in_flight.values()) \
                    > self.batch_timeout_ms:
                out.append((vid, "batch_timeout"))
        return out

    def declare_dead(self, vid: str, reason: str, now_ms: float) -> Death:
        v = self.verifiers[vid]
        v.alive, v.dead_since_ms = False, now_ms
        entries = [e for batch in v.in_flight.values() for e in batch.entries]
        if reason == "batch_timeout":
            v.stuck_batch_ids = set(v.in_flight)
        entries += v.queue
        v.in_flight, v.queue = {}, []
        moved: dict[str, str] = {}
        for sid in sorted(self.sessions.sids_of(vid)):  # sorted: deterministic spread
            new = self.pick(self.sessions.get(sid))
            if new is None:
                continue  # it stays mapped to the dead verifier until one can take it
            self.sessions.move(sid, new)
            moved[sid] = new
        num_orphaned = 0
        for entry in sorted(entries, key=lambda e: e.arrival_ms):
            target, more = self._route(entry.sid, now_ms)
            moved.update(more)
            self._put(target, entry)
            num_orphaned += target is None
        return Death(vid, reason, moved, len(entries) - num_orphaned, num_orphaned)

    # -- sessions ---------------------------------------------------------------------------
    def verifier_of(self, sid: str) -> str | None:
        return self.sessions.verifier_of(sid)

    def assign(self, sid: str, vid: str, now_ms: float, **known: Any) -> SessionEntry:
        """Place `sid` on `vid` (a verifier not yet heard from is allowed: a session loaded
        from Redis right after a scheduler restart); `known`: what SessionTable.add takes."""
        return self.sessions.add(sid, vid, now_ms, **known)

    def forget(self, sid: str) -> None:
        self.sessions.forget(sid)

    def forget_idle(self, now_ms: float, max_idle_ms: float) -> int:
        return self.sessions.forget_idle(now_ms, max_idle_ms)

    def num_sessions(self, vid: str) -> int:
        return self.sessions.num_sessions(vid)

    def candidates(self) -> list[VerifierInfo]:
        """Live verifiers, best first for a new session: fewest assigned sessions, then most
        free KV blocks (then id, for determinism)."""
        live = [v for v in self.verifiers.values() if v.alive]
        return sorted(live, key=lambda v: (self.num_sessions(v.verifier_id), -v.free_blocks,
                                           v.verifier_id))

    def pick(self, entry: SessionEntry | None = None) -> str | None:
        """The best live verifier that can serve the session (any, when its needs are not
        known); None when there is none."""
        return next((v.verifier_id for v in self.candidates() if v.can_serve(entry)), None)

    # -- queues and batches -----------------------------------------------------------------
    def enqueue(self, entry: PendingVerify, now_ms: float) -> tuple[str | None, dict[str, str]]:
        """Queue `entry` at its session's verifier, moving the session first if that one is
        dead. Returns (verifier or None when orphaned, {sid: new verifier} if moved)."""
        self.sessions.touch(entry.sid, now_ms)
        target, moved = self._route(entry.sid, now_ms)
        self._put(target, entry)
        return target, moved

    def place_orphans(self, now_ms: float) -> tuple[set[str], dict[str, str]]:
        """Queue orphans whose session can now be placed. Returns (verifiers that got
        entries, {sid: new verifier} moves)."""
        waiting, self.orphans = self.orphans, []
        touched: set[str] = set()
        moved: dict[str, str] = {}
        for entry in waiting:
            target, more = self._route(entry.sid, now_ms)
            moved.update(more)
            self._put(target, entry)
            if target is not None:
                touched.add(target)
        return touched, moved

    def start_batch(self, vid: str, batch_id: str, entries: list[PendingVerify],
                    now_ms: float) -> InFlightBatch:
        """Take `entries` off `vid`'s queue as one of its in-flight batches."""
        v = self.verifiers[vid]
        chosen = {id(e) for e in entries}
        v.queue = [e for e in v.queue if id(e) not in chosen]
        batch = v.in_flight[batch_id] = InFlightBatch(batch_id, list(entries), now_ms)
        return batch

    def abort_batch(self, vid: str, batch_id: str) -> None:
        """Put a batch that could not be sent back at the head of its verifier's queue."""
        v = self.verifiers[vid]
        batch = v.in_flight.pop(batch_id, None)
        if batch is not None:
            v.queue[:0] = batch.entries

    def finish_batch(self, vid: str, batch_id: str,
                     done: BatchDone | None = None) -> InFlightBatch | None:
        """A verifier reported `batch_id` done: the finished batch, or None if it was not in
        flight (a late done from before a death, or another scheduler's batch)."""
        v = self.verifiers.get(vid)
        if v is None:
            return None
        if done is not None:
            v.recent_done.append(done)
            self.sessions.report(done)
            if v.estimator is not None and batch_id in v.in_flight:
                v.estimator.observe(BatchShape(done.num_linear, done.num_interactions,
                                               done.num_cached), done.batch_ms)
        finished = v.in_flight.pop(batch_id, None)
        if finished is None:
            v.stuck_batch_ids.discard(batch_id)  # came unstuck: its next heartbeat revives it
        return finished

    def expire(self, now_ms: float, max_age_ms: float) -> list[PendingVerify]:
        """Remove and return queued entries (orphans included) older than `max_age_ms`."""
        expired: list[PendingVerify] = []

        def keep(queue: list[PendingVerify]) -> list[PendingVerify]:
            kept = []
            for e in queue:
                (expired if now_ms - e.arrival_ms > max_age_ms else kept).append(e)
            return kept

        self.orphans = keep(self.orphans)
        for v in self.verifiers.values():
            if v.queue:
                v.queue = keep(v.queue)
        return expired

    def dispatchable(self, max_in_flight: int = 1) -> list[str]:
        """Live verifiers with queued entries and room for another batch in flight."""
        return [vid for vid, v in self.verifiers.items()
                if v.alive and len(v.in_flight) < max_in_flight and v.queue]

    def has_pending_work(self) -> bool:
        """Anything queued at or running on a live verifier."""
        return any(v.alive and (v.queue or v.in_flight) for v in self.verifiers.values())

    def snapshot(self, now_ms: float) -> dict[str, Any]:
        out = []
        for vid, v in sorted(self.verifiers.items()):
            out.append({
                "id": vid, "alive": v.alive, "model": v.model, "hardware": v.hardware,
                "free_blocks": v.free_blocks, "total_blocks": v.total_blocks,
                "k_max": v.limits.k_max if v.limits else None,
                "sessions": self.num_sessions(vid), "reported_sessions": v.reported_sessions,
                "queue_depth": len(v.queue),
                "estimator": None if v.estimator is None else {
                    "advertised": v.advertised.source if v.advertised else None,
                    "coefficients": v.estimator.current.as_dict(),
                    "refits": v.estimator.num_refits,
                    **{k: round(x, 4) for k, x in v.estimator.stats().items()}},
                "in_flight": [{"batch_id": b.batch_id, "size": len(b.entries),
                               "age_ms": round(now_ms - b.started_ms, 1)}
                              for b in v.in_flight.values()],
                "last_seen_ms_ago": round(now_ms - v.last_seen_ms, 1),
            })
        return {"verifiers": out, "orphaned": len(self.orphans), "sessions": len(self.sessions)}

    # -- internals --------------------------------------------------------------------------
    def _route(self, sid: str, now_ms: float) -> tuple[str | None, dict[str, str]]:
        vid = self.sessions.verifier_of(sid)
        if vid is not None and self.is_alive(vid):
            return vid, {}
        if (vid is not None and vid not in self.verifiers
                and now_ms - self.started_ms < self.heartbeat_timeout_ms):
            return None, {}  # just started: its verifier may still say hello
        new = self.pick(self.sessions.get(sid))
        if new is None:
            return None, {}
        if vid is None:
            self.sessions.add(sid, new, now_ms)
        else:
            self.sessions.move(sid, new)
        return new, {sid: new}

    def _put(self, vid: str | None, entry: PendingVerify) -> None:
        queue = self.orphans if vid is None else self.verifiers[vid].queue
        for i, queued in enumerate(queue):
            if queued.key == entry.key:  # a retry: new inbox and deadline, same place
                entry.arrival_ms = min(queued.arrival_ms, entry.arrival_ms)
                queue[i] = entry
                return
        # Arrival order; new arrivals append, moved entries slot in where they arrived.
        i = len(queue)
        while i > 0 and queue[i - 1].arrival_ms > entry.arrival_ms:
            i -= 1
        queue.insert(i, entry)
