"""The scheduler's view of the verifiers: liveness, session placement, queues, in-flight batches.

Pure Python, no NATS or Redis: the service feeds it heartbeats, submits and `done`s with the
current time and writes the placements it returns to Redis. All times are the scheduler's wall
clock in ms (the same clock as request deadlines).

* A verifier is *live* from its first heartbeat until it is silent for `heartbeat_timeout_s` or
  its batch is not done within `batch_timeout_s`; then it is declared dead: its sessions are
  spread over the live verifiers (fewest sessions first) and its queued and in-flight entries
  follow them. Re-running an in-flight entry elsewhere is safe: rounds are idempotent per
  (sid, round) through Redis.
* A verifier declared dead for a hung batch is not revived by its heartbeats (they come from
  its event loop, which may be fine while its worker is stuck) until that batch's `done`
  arrives or another `batch_timeout_s` has passed; one declared dead for silence is revived by
  its next heartbeat (a restarted process that kept its id).
* Entries that cannot be placed (no live verifier) wait in `orphans` until one appears; the
  service answers those waiting longer than `batch_timeout_s` with a capacity error.
* Each verifier runs at most one batch at a time; its queue is in arrival order, and a retry of
  a queued (sid, round) replaces the queued one (new reply inbox and deadline) in its place.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from common.protocol import BatchDone, Heartbeat
from services.admission_scheduler.batching import PendingVerify, VerifierState

__all__ = ["DONE_HISTORY", "Death", "InFlightBatch", "VerifierInfo", "VerifierRegistry"]

DONE_HISTORY = 64  # BatchDone messages kept per verifier (estimator feedback)


@dataclass(slots=True)
class InFlightBatch:
    batch_id: str
    entries: list[PendingVerify]
    started_ms: float


@dataclass(slots=True)
class VerifierInfo:
    verifier_id: str
    last_seen_ms: float
    model: str = ""
    hardware: str = ""
    free_blocks: int = 0
    total_blocks: int = 0
    reported_sessions: int = 0  # sessions the verifier holds KV for, by its own count
    alive: bool = True
    dead_since_ms: float = 0.0
    stuck_batch_id: str | None = None  # declared dead while this batch was running
    queue: list[PendingVerify] = field(default_factory=list)
    in_flight: InFlightBatch | None = None
    recent_done: deque[BatchDone] = field(default_factory=lambda: deque(maxlen=DONE_HISTORY))

    def state(self) -> VerifierState:
        return VerifierState(verifier_id=self.verifier_id, model=self.model,
                             hardware=self.hardware, free_blocks=self.free_blocks,
                             total_blocks=self.total_blocks, recent_done=tuple(self.recent_done))


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
                 now_ms: float = 0.0):
        self.heartbeat_timeout_ms = heartbeat_timeout_s * 1e3
        self.batch_timeout_ms = batch_timeout_s * 1e3
        self.started_ms = now_ms
        self.verifiers: dict[str, VerifierInfo] = {}
        self.orphans: list[PendingVerify] = []  # no live verifier to queue them at yet
        self._session_vid: dict[str, str] = {}
        self._sessions_of: defaultdict[str, set[str]] = defaultdict(set)
        self._session_seen_ms: dict[str, float] = {}

    # -- liveness ---------------------------------------------------------------------------
    def heartbeat(self, hb: Heartbeat, now_ms: float) -> bool:
        """Record a heartbeat; True when the verifier (re)joins the live set."""
        v = self.verifiers.get(hb.verifier_id)
        joined = False
        if v is None:
            v = self.verifiers[hb.verifier_id] = VerifierInfo(hb.verifier_id, now_ms)
            joined = True
        elif not v.alive and (v.stuck_batch_id is None
                              or now_ms - v.dead_since_ms >= self.batch_timeout_ms):
            v.alive, v.stuck_batch_id = True, None
            joined = True
        v.last_seen_ms = now_ms
        v.model, v.hardware = hb.model, hb.hardware
        v.free_blocks, v.total_blocks = hb.free_blocks, hb.total_blocks
        v.reported_sessions = hb.num_sessions
        return joined

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
            elif v.in_flight and now_ms - v.in_flight.started_ms > self.batch_timeout_ms:
                out.append((vid, "batch_timeout"))
        return out

    def declare_dead(self, vid: str, reason: str, now_ms: float) -> Death:
        v = self.verifiers[vid]
        v.alive, v.dead_since_ms = False, now_ms
        entries = list(v.in_flight.entries) if v.in_flight else []
        if reason == "batch_timeout" and v.in_flight:
            v.stuck_batch_id = v.in_flight.batch_id
        entries += v.queue
        v.in_flight, v.queue = None, []
        moved: dict[str, str] = {}
        for sid in sorted(self._sessions_of.get(vid, ())):  # sorted: deterministic spread
            new = self.pick()
            if new is None:
                break  # they stay mapped to the dead verifier until one is live
            self.assign(sid, new, now_ms)
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
        return self._session_vid.get(sid)

    def assign(self, sid: str, vid: str, now_ms: float) -> None:
        """Place `sid` on `vid` (a verifier not yet heard from is allowed: a session loaded
        from Redis right after a scheduler restart). `now_ms` counts as the session's last
        use only for a session not seen before."""
        old = self._session_vid.get(sid)
        if old is not None:
            self._sessions_of[old].discard(sid)
        self._session_vid[sid] = vid
        self._sessions_of[vid].add(sid)
        self._session_seen_ms.setdefault(sid, now_ms)

    def forget(self, sid: str) -> None:
        vid = self._session_vid.pop(sid, None)
        self._session_seen_ms.pop(sid, None)
        if vid is not None:
            self._sessions_of[vid].discard(sid)

    def forget_idle(self, now_ms: float, max_idle_ms: float) -> int:
        """Drop placements of sessions unseen for `max_idle_ms` (expired or closed elsewhere);
        Redis still has the placement if one comes back."""
        idle = [sid for sid, seen in self._session_seen_ms.items() if now_ms - seen > max_idle_ms]
        for sid in idle:
            self.forget(sid)
        return len(idle)

    def num_sessions(self, vid: str) -> int:
        return len(self._sessions_of.get(vid, ()))

    def pick(self) -> str | None:
        """The live verifier for a new session: fewest assigned sessions, then most free KV
        blocks (then id, for determinism). None when no verifier is live."""
        live = [v for v in self.verifiers.values() if v.alive]
        if not live:
            return None
        best = min(live, key=lambda v: (self.num_sessions(v.verifier_id), -v.free_blocks,
                                        v.verifier_id))
        return best.verifier_id

    # -- queues and batches -----------------------------------------------------------------
    def enqueue(self, entry: PendingVerify, now_ms: float) -> tuple[str | None, dict[str, str]]:
        """Queue `entry` at its session's verifier, moving the session first if that one is
        dead. Returns (verifier or None when orphaned, {sid: new verifier} if moved)."""
        self._session_seen_ms[entry.sid] = now_ms
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
        """Take `entries` off `vid`'s queue as its in-flight batch."""
        v = self.verifiers[vid]
        if v.in_flight is not None:
            raise RuntimeError(f"verifier {vid} already runs batch {v.in_flight.batch_id}")
        chosen = {id(e) for e in entries}
        v.queue = [e for e in v.queue if id(e) not in chosen]
        v.in_flight = InFlightBatch(batch_id, list(entries), now_ms)
        return v.in_flight

    def abort_batch(self, vid: str, batch_id: str) -> None:
        """Put a batch that could not be sent back at the head of its verifier's queue."""
        v = self.verifiers[vid]
        if v.in_flight is not None and v.in_flight.batch_id == batch_id:
            v.queue[:0] = v.in_flight.entries
            v.in_flight = None

    def finish_batch(self, vid: str, batch_id: str,
                     done: BatchDone | None = None) -> InFlightBatch | None:
        """A verifier reported `batch_id` done: the finished batch, or None if it was not the
        one in flight (a late done from before a death, or another scheduler's batch)."""
        v = self.verifiers.get(vid)
        if v is None:
            return None
        if done is not None:
            v.recent_done.append(done)
        if v.in_flight is not None and v.in_flight.batch_id == batch_id:
            finished, v.in_flight = v.in_flight, None
            return finished
        if v.stuck_batch_id == batch_id:
            v.stuck_batch_id = None  # it came unstuck: its next heartbeat revives it
        return None

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

    def dispatchable(self) -> list[str]:
        """Live, idle verifiers with queued entries."""
        return [vid for vid, v in self.verifiers.items()
                if v.alive and v.in_flight is None and v.queue]

    def has_pending_work(self) -> bool:
        """Anything queued at or running on a live verifier."""
        return any(v.alive and (v.queue or v.in_flight) for v in self.verifiers.values())

    def snapshot(self, now_ms: float) -> dict[str, Any]:
        out = []
        for vid, v in sorted(self.verifiers.items()):
            flight = v.in_flight
            out.append({
                "id": vid, "alive": v.alive, "model": v.model, "hardware": v.hardware,
                "free_blocks": v.free_blocks, "total_blocks": v.total_blocks,
                "sessions": self.num_sessions(vid), "reported_sessions": v.reported_sessions,
                "queue_depth": len(v.queue),
                "in_flight": None if flight is None else {
                    "batch_id": flight.batch_id, "size": len(flight.entries),
                    "age_ms": round(now_ms - flight.started_ms, 1)},
                "last_seen_ms_ago": round(now_ms - v.last_seen_ms, 1),
            })
        return {"verifiers": out, "orphaned": len(self.orphans),
                "sessions": len(self._session_vid)}

    # -- internals --------------------------------------------------------------------------
    def _route(self, sid: str, now_ms: float) -> tuple[str | None, dict[str, str]]:
        vid = self._session_vid.get(sid)
        if vid is not None and self.is_alive(vid):
            return vid, {}
        if (vid is not None and vid not in self.verifiers
                and now_ms - self.started_ms < self.heartbeat_timeout_ms):
            return None, {}  # just started: its verifier may still say hello
        new = self.pick()
        if new is None:
            return None, {}
        self.assign(sid, new, now_ms)
        return new, {sid: new}

    def _put(self, vid: str | None, entry: PendingVerify) -> None:
        queue = self.orphans if vid is None else self.verifiers[vid].queue
        for i, queued in enumerate(queue):
            if queued.key == entry.key:  # a retry: new inbox and deadline, same place
                queue[i] = PendingVerify(entry.request, entry.reply_to,
                                         min(queued.arrival_ms, entry.arrival_ms),
                                         entry.deadline_ms)
                return
        # Arrival order; new arrivals append, moved entries slot in where they arrived.
        i = len(queue)
        while i > 0 and queue[i - 1].arrival_ms > entry.arrival_ms:
            i -= 1
        queue.insert(i, entry)
