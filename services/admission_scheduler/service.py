"""The admission-scheduler: sessions in, verify requests batched out to the verifiers.

Transport around pure modules (docs/architecture.md, "One round" and "Failure and bad input"):
`registry.VerifierRegistry` (liveness, placement, queues, in-flight batches) with its
`sessions.SessionTable` (SLO, committed and cached length per session, fed by the verifiers'
reports), and a `batching.BatchPolicy` (which queued requests run next, and when to ask again).
This module decodes, validates, writes Redis, publishes batches, and turns every problem into
an error reply, a log line, a counter and an `error` event; it never dies on bad input.

Dispatch runs on every event that can change a decision (submit, done, heartbeat), at the time
a policy asks to be woken (a latest start time), and on a periodic check. A verifier may have
up to `max_batches_in_flight` batches; it reports `done` when a batch's forward pass ends, so the
next batch can start while the previous one's commits and replies are still going out.

Subscriptions:
* `wisp.session.open` / `wisp.session.close` / `wisp.verify.submit` / `wisp.server.generate`:
  queue group `SCHEDULER_QUEUE` (schedulers scale as group members);
* `wisp.verifier.heartbeat` and `wisp.verifier.*.done`: no group, every scheduler needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import redis.exceptions
import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from common.config import BaseConfig
from common.engine.estimator import BatchShape
from common.errors import ErrorCode, WispError
from common.limits import check_ids, mismatch
from common.protocol import (
    MAX_BATCH_ENTRIES,
    MAX_DRAFT_TOKENS,
    MODES,
    SERVER_MODES,
    BatchDone,
    BatchEntry,
    ErrorEvent,
    GenerateRequest,
    Heartbeat,
    ModelLimits,
    ScheduleEvent,
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    VerifierBatch,
    VerifyRequest,
    decode,
    encode,
    error_reply,
)
from common.store import SESSION_TTL_S, SessionRecord, SessionStore, now_ms
from common.subjects import (
    DEADLINES_KEY,
    GENERATE_EDGE,
    SCHEDULER_QUEUE,
    SERVER_GENERATE,
    SESSION_CLOSE,
    SESSION_OPEN,
    SUBJECT_PREFIX,
    VERIFIER_HEARTBEAT,
    VERIFY_SUBMIT,
    deadline_member,
    verifier_batch,
)
from common.transport.service import Service, publish_event, publish_refusal
from services.admission_scheduler.admission import (
    AdmissionController,
    AdmissionDecision,
    AdmittedSession,
    Candidate,
)
from services.admission_scheduler.batching import (
    POLICIES,
    BatchPolicy,
    PendingVerify,
    kv_claim,
    make_policy,
)
from services.admission_scheduler.downlink import DownlinkEstimator
from services.admission_scheduler.registry import VerifierRegistry

log = structlog.get_logger(__name__)

SERVICE_NAME = "admission-scheduler"
VERIFIER_DONE_ALL = f"{SUBJECT_PREFIX}.verifier.*.done"
CHECK_INTERVAL_S = 0.25  # liveness, batch timeouts, expiry, orphan placement
SWEEP_INTERVAL_S = 60.0  # forget idle sessions, trim stale deadline members
DEADLINE_RETENTION_MS = 600_000.0  # members this far past their deadline are leftovers
SERVER_DEVICE_ID = "server"  # device id of server-side (centralized/colocated) sessions
DRAFTER_K_MAX = 16  # the server drafter's upper bound on k (a session may ask for less)
ADMISSION_MODES = ("off", "reject", "queue")
# The batch policy each mode is served with under policy "auto": WISP's modes get its SLO-aware
# scheduler, the baselines keep SLED's first come, first served.
MODE_POLICIES = {"wisp": "wisp", "ucb": "wisp", "sled": "fcfs", "centralized": "fcfs",
                 "colocated": "fcfs"}
POLICY_PRECEDENCE = ("wisp", "edf", "fcfs")

def _default_target() -> str:
    from common.models.loading import DEFAULT_TARGET  # imports torch: only when needed

    return DEFAULT_TARGET


@dataclass(slots=True)
class SchedulerConfig(BaseConfig):
    """admission-scheduler: sessions, verifier routing and verify batching."""

    heartbeat_timeout_s: float = 3.0  # a verifier silent this long is dead
    batch_timeout_s: float = 30.0  # a batch not done this long: its verifier is dead
    max_batch_size: int = 32
    max_batch_tokens: int = 8192  # Σ (drafted + 1) over a batch; a lone larger request runs alone
    max_batches_in_flight: int = 1  # per verifier (it queues them); 2+ hides the dispatch gap
    policy: str = "auto"  # auto (by the queued sessions' modes) | fcfs | edf | wisp
    starvation_passes: int = 8  # batches that may pass a request over before it goes first
    guard_quantile: float = 0.9  # δ = this quantile of the estimator's recent under-predictions
    default_k_max: int = 8  # server-side modes, when the request gives none
    max_prompt_tokens: int = 0  # server-side modes; 0: half the target's context
    draft_model: str = ""  # "" disables the colocated mode
    target_model: str = field(default_factory=_default_target)  # tokenizer of server-side modes
    downlink_ms: float = 0.0  # downlink estimate of a device before its round trips are known
    downlink_quantile: float = 0.9  # of a device's measured network round trips
    admission: str = "reject"  # off | reject (overloaded + retry_after_ms) | queue (then reject)
    admission_queue: int = 64  # opens that may wait for capacity (admission = queue)
    admission_wait_s: float = 10.0  # how long one may wait before it is refused
    max_sessions_per_verifier: int = 0  # a hard cap besides the estimate; 0: none
    # Share of an SLO's per-round time (k + 1)·TPOT, and of its TTFT, taken as the server's
    # until a session's own budget is observed (server-side modes: all of it).
    admission_server_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout_s", "batch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 1 <= self.max_batch_size <= MAX_BATCH_ENTRIES:
            raise ValueError(f"max_batch_size must be within [1, {MAX_BATCH_ENTRIES}], "
                             f"got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got "
                             f"{self.max_batches_in_flight}")
        if self.policy != "auto" and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose auto or one of "
                             f"{', '.join(sorted(POLICIES))}")
        if self.starvation_passes < 1:
            raise ValueError(f"starvation_passes must be >= 1, got {self.starvation_passes}")
        for name in ("guard_quantile", "downlink_quantile"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be within (0, 1), got {getattr(self, name)!r}")
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_MODES)}, "
                             f"got {self.admission!r}")
        if self.admission_queue < 0 or self.max_sessions_per_verifier < 0:
            raise ValueError("admission_queue and max_sessions_per_verifier must be >= 0")
        if not 0.0 < self.admission_server_share <= 1.0:
            raise ValueError(f"admission_server_share must be within (0, 1], got "
                             f"{self.admission_server_share!r}")
        if not self.admission_wait_s > 0:
            raise ValueError(f"admission_wait_s must be > 0, got {self.admission_wait_s!r}")
        if not 1 <= self.default_k_max <= MAX_DRAFT_TOKENS:
            raise ValueError(f"default_k_max must be within [1, {MAX_DRAFT_TOKENS}], "
                             f"got {self.default_k_max}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        if self.downlink_ms < 0:
            raise ValueError(f"downlink_ms must be >= 0, got {self.downlink_ms}")


Handler = Callable[[Msg], Awaitable[None]]


class SchedulerService(Service):
    name = SERVICE_NAME

    def __init__(self, config: SchedulerConfig):
        super().__init__()
        self.config = config
        # "auto": each mode's own policy (MODE_POLICIES); one queue holding several modes
        # is batched by the most deadline-aware of theirs.
        names = sorted(set(MODE_POLICIES.values())) if config.policy == "auto" else [
            config.policy]
        self.policies = {name: make_policy(name, config) for name in names}
        self.registry = VerifierRegistry(config.heartbeat_timeout_s, config.batch_timeout_s,
                                         now_ms(), guard_quantile=config.guard_quantile)
        self.downlink = DownlinkEstimator(config.downlink_ms, config.downlink_quantile)
        self.admission = AdmissionController(
            server_share=config.admission_server_share,
            max_sessions_per_verifier=config.max_sessions_per_verifier,
            batches_in_flight=config.max_batches_in_flight)
        self._room = asyncio.Event()  # set when a close or a done may have made room
        self._opens_waiting = 0
        self._queued_opens: set[asyncio.Task] = set()
        self.counters: Counter[str] = Counter()
        self.store: SessionStore | None = None
        self._subs: dict[str, Subscription] = {}
        self._generations: set[asyncio.Task] = set()
        self._check_task: asyncio.Task | None = None
        self._batch_ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count())
        self._last_sweep_ms = 0.0
        self._ready = False
        self._stopping = False
        self._wakes: dict[str, asyncio.TimerHandle] = {}  # a policy's wake-up per verifier
        self._woken: set[asyncio.Task] = set()
        self._deadline_writes: set[asyncio.Task] = set()  # see _keep_deadline
        self._server: Any = None  # common.transport.generation.GenerationServer once loaded
        self._server_unavailable = "server-side modes are still loading"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.nc is not None and self.redis is not None
        self.store = SessionStore(self.redis)
        self.registry.started_ms = self._last_sweep_ms = now_ms()
        await self._load_server_side()
        nc = self.nc
        self._subs["heartbeat"] = await nc.subscribe(
            VERIFIER_HEARTBEAT, cb=self._guard("heartbeat", self._on_heartbeat))
        self._subs["done"] = await nc.subscribe(
            VERIFIER_DONE_ALL, cb=self._guard("done", self._on_done))
        for key, subject, handler in (
                ("close", SESSION_CLOSE, self._on_close),
                ("submit", VERIFY_SUBMIT, self._on_submit),
                ("open", SESSION_OPEN, self._on_open),
                ("generate", SERVER_GENERATE, self._on_generate)):
            self._subs[key] = await nc.subscribe(subject, queue=SCHEDULER_QUEUE,
                                                 cb=self._guard(key, handler))
        self._check_task = asyncio.create_task(self._check_loop(), name="scheduler-check")
        self._ready = True
        log.info("scheduler_started", policy=self.config.policy, policies=sorted(self.policies),
                 server_side=self._server is not None,
                 colocated=bool(self.config.draft_model))

    async def stop(self) -> None:
        """Stop taking sessions and generations, let server-side generations finish (their
        rounds still go through this scheduler), then stop taking rounds and run what is
        queued and in flight. The caller bounds the whole (drain_timeout_s)."""
        self._stopping = True
        try:
            await self._drain("open", "generate")
            if self._generations:
                await asyncio.gather(*self._generations, return_exceptions=True)
            await self._drain("submit")
            while self.registry.has_pending_work():
                await asyncio.sleep(0.05)
            if self._deadline_writes:
                await asyncio.gather(*self._deadline_writes, return_exceptions=True)
        finally:
            for task in (*self._generations, *self._queued_opens):
                task.cancel()
            if self._check_task is not None:
                self._check_task.cancel()
            for handle in self._wakes.values():
                handle.cancel()
            drafter = getattr(self._server, "drafter", None)
            if drafter is not None:
                drafter.shutdown()
        await self._unsubscribe("heartbeat", "done", "close")
        log.info("scheduler_stopped", counters=dict(self.counters))

    def ready(self) -> bool:
        # No verifier is not "unready": open answers CAPACITY until one says hello.
        return self._ready and not self._stopping

    def routes(self) -> list[web.RouteDef]:
        async def verifiers(_: web.Request) -> web.Response:
            snapshot = self.registry.snapshot(now_ms())
            snapshot["counters"] = dict(self.counters)
            snapshot["policy"] = self.config.policy
            snapshot["downlink"] = {"devices": len(self.downlink),
                                    "recent": self.downlink.snapshot()}
            return web.json_response(snapshot)

        return [web.get("/verifiers", verifiers)]

    async def _unsubscribe(self, *keys: str) -> None:
        for key in keys:
            sub = self._subs.pop(key, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _drain(self, *keys: str) -> None:
        """Stop taking messages on these subscriptions and wait until the handlers of those
        already delivered have finished, while NATS and Redis are still up. (Unsubscribing
        cancels the handler task, and a cancellation can be swallowed inside redis-py's
        wait_for on Python 3.11, leaving handlers running past stop() into closed
        connections.)"""
        for key in keys:
            sub = self._subs.pop(key, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.drain()

    # -- handlers -----------------------------------------------------------------------------
    def _guard(self, what: str, handler: Handler) -> Handler:
        """Turn whatever `handler` raises into an error reply; never let it escape."""

        async def run(msg: Msg | None) -> None:
            reply = getattr(msg, "reply", None) or None
            try:
                await handler(msg)
            except WispError as err:
                sid = structlog.contextvars.get_contextvars().get("sid")
                await self._reject(reply, err, what, sid)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the service
                log.exception("handler_failed", handler=what)
                sid = structlog.contextvars.get_contextvars().get("sid")
                # A lost connection is transient (the sender retries the same, idempotent
                # round); anything else is a bug.
                code = ErrorCode.UNAVAILABLE if _is_transient(exc) else ErrorCode.INTERNAL
                await self._reject(reply, WispError(
                    code, f"{what}: {type(exc).__name__}: {exc}"), what, sid)
            finally:
                structlog.contextvars.unbind_contextvars("sid")

        return run

    async def _on_open(self, msg: Msg) -> None:
        req = decode(SessionOpen, msg.data)
        structlog.contextvars.bind_contextvars(sid=req.spec.sid)
        check_ids(req.prompt_ids, req.vocab.size, "prompt")
        vid = self._place(req)
        cfg = self.config
        decision = None if cfg.admission == "off" else self._decide(req, vid)
        if decision is not None and not decision.admit:
            if cfg.admission == "queue" and self._opens_waiting < cfg.admission_queue:
                # Waits in its own task: NATS runs this subscription's callbacks one at a
                # time, and the opens behind this one must not wait with it.
                self._opens_waiting += 1
                self.counters["admission_queued"] += 1
                await publish_event(self.nc, decision.event(
                    sid=req.spec.sid, ts_ms=now_ms(), verifier_id=vid, outcome="queued"))
                task = asyncio.create_task(self._guard("open", lambda m: self._open_queued(
                    req, m))(msg), name=f"open-{req.spec.sid}")
                self._queued_opens.add(task)
                task.add_done_callback(self._queued_opens.discard)
                return
            await self._refuse(req, vid, decision)
        await self._open_on(req, vid, decision, msg.reply)

    async def _open_queued(self, req: SessionOpen, msg: Msg) -> None:
        """An open admission control queued: decided again whenever a close or a batch may
        have made room, until `admission_wait_s` has passed."""
        try:
            deadline = time.monotonic() + self.config.admission_wait_s
            vid = self._place(req)
            decision = self._decide(req, vid)
            while not decision.admit and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), left)
                self._room.clear()
                vid = self._place(req)
                decision = self._decide(req, vid)
        finally:
            self._opens_waiting -= 1
        if not decision.admit:
            await self._refuse(req, vid, decision)
        await self._open_on(req, vid, decision, msg.reply)

    async def _refuse(self, req: SessionOpen, vid: str, decision: AdmissionDecision) -> None:
        self.counters["admission_refused"] += 1
        await publish_event(self.nc, decision.event(sid=req.spec.sid, ts_ms=now_ms(),
                                                    verifier_id=vid))
        raise WispError(ErrorCode.OVERLOADED, decision.reason,
                        retry_after_ms=decision.retry_after_ms)

    async def _open_on(self, req: SessionOpen, vid: str, decision: AdmissionDecision | None,
                       reply: str | None) -> None:
        """Open the admitted session on `vid`: the session table, Redis, the reply."""
        spec = req.spec
        now = now_ms()
        self.registry.assign(spec.sid, vid, now, spec=spec, vocab=req.vocab,
                             prompt_len=len(req.prompt_ids),
                             committed_len=len(req.prompt_ids))
        record = SessionRecord(spec=spec, vocab=req.vocab, prompt_len=len(req.prompt_ids),
                               verifier_id=vid, created_ms=now, tokens=list(req.prompt_ids))
        try:
            await self.store.create(record)
        except BaseException:
            self.registry.forget(spec.sid)
            raise
        self.counters["sessions_opened"] += 1
        if decision is not None:
            self.counters["admission_admitted"] += 1
            await publish_event(self.nc, decision.event(sid=spec.sid, ts_ms=now,
                                                        verifier_id=vid))
        log.info("session_opened", verifier=vid, mode=spec.mode,
                 prompt_tokens=len(req.prompt_ids),
                 predicted_round_ms=round(decision.predicted_round_ms, 2) if decision else None)
        if reply:
            await self._publish(reply, encode(SessionOpened(
                sid=spec.sid, verifier_id=vid, committed_len=len(req.prompt_ids))))

    def _decide(self, req: SessionOpen, vid: str) -> AdmissionDecision:
        """Admission's verdict on `req` joining `vid` at its current load."""
        sessions = self.registry.sessions
        admitted = [a for sid in sessions.sids_of(vid) if sid != req.spec.sid
                    and (a := AdmittedSession.of(sessions.entries[sid])) is not None]
        est = self.registry.verifiers[vid].estimator
        return self.admission.decide(Candidate.of(req), admitted,
                                     est.current if est is not None else None,
                                     est.guard_ms if est is not None else 0.0)

    def _place(self, req: SessionOpen) -> str:
        """The verifier for a new session: the best live one whose limits (vocabulary, k_max,
        context) fit it. Refused at open, with what disagrees, when no live one fits."""
        candidates = self.registry.candidates()
        if not candidates:
            raise WispError(ErrorCode.CAPACITY, "no verifier is available; retry later")
        first_problem = None
        for v in candidates:
            if v.limits is None:
                return v.verifier_id
            problem = mismatch(req.spec, len(req.prompt_ids), req.vocab, v.limits,
                               f"verifier {v.verifier_id}")
            if problem is None:
                return v.verifier_id
            first_problem = first_problem or problem
        raise first_problem

    async def _on_close(self, msg: Msg) -> None:
        req = decode(SessionClose, msg.data)
        structlog.contextvars.bind_contextvars(sid=req.sid)
        await self.store.close(req.sid)  # a no-op for a session that is already gone
        self.registry.forget(req.sid)
        self._room.set()
        self.counters["sessions_closed"] += 1
        log.info("session_closed")
        if msg.reply:
            await self._publish(msg.reply, encode(SessionClosed(sid=req.sid)))

    async def _on_submit(self, msg: Msg) -> None:
        req = decode(VerifyRequest, msg.data)
        structlog.contextvars.bind_contextvars(sid=req.sid)
        if not msg.reply:
            raise WispError(ErrorCode.BAD_REQUEST, f"{VERIFY_SUBMIT} needs a reply inbox "
                            "(send it as a NATS request): the result goes there")
        entry = self.registry.sessions.get(req.sid)
        learned = entry is None or entry.spec is None
        if learned:
            entry = await self._learn(req.sid)
        if len(req.draft_ids) > entry.spec.k_max:
            raise WispError(ErrorCode.DRAFT_TOO_LONG,
                            f"draft has {len(req.draft_ids)} tokens; the session's k_max is "
                            f"{entry.spec.k_max}")
        arrival = now_ms()
        sessions = self.registry.sessions
        if req.prev_rtt_ms is not None:
            server_ms = sessions.round_server_ms(entry, req.round - 1)
            if server_ms is not None:
                self.downlink.observe(req.device_id, req.prev_rtt_ms - server_ms)
        downlink = self.downlink.estimate(req.device_id)
        deadline = arrival + req.budget_ms - downlink
        if learned:  # new to this scheduler (a restart?): a retry keeps its first deadline
            deadline = await self._deadline(req, deadline)
        # Round 0's budget is what the TTFT left, not a round's share of the TPOT.
        sessions.submitted(entry, req.round, arrival, req.budget_ms - downlink
                           if entry.spec.slo is not None and req.round > 0 else None)
        num_new, num_cached = sessions.round_shape(req.sid, req.base_len, len(req.draft_ids))
        pending = PendingVerify(request=req, reply_to=msg.reply, arrival_ms=arrival,
                                deadline_ms=deadline, slo=entry.spec.slo, num_new=num_new,
                                num_cached=num_cached, mode=entry.spec.mode)
        vid, moved = self.registry.enqueue(pending, arrival)
        self.counters["verify_requests"] += 1
        try:
            if moved:
                log.warning("session_moved", to=moved[req.sid], reason="verifier not live")
                await self._write_moves(moved)
            if vid is None:
                log.info("queued_without_verifier", round=req.round)
                return
            await self._dispatch(vid)
        finally:
            if not learned:
                self._keep_deadline(pending)  # after the dispatch: its batch is written first

    async def _learn(self, sid: str):
        """A session this scheduler has not seen (it restarted, or another one opened it):
        its record from Redis fills the session table, SLO and placement included."""
        try:
            record = await self.store.load(sid)
        except ValueError as exc:
            raise WispError(ErrorCode.UNKNOWN_SESSION,
                            f"session {sid} has an unreadable record: {exc}") from None
        if record is None or record.state == "closed":
            raise WispError(ErrorCode.UNKNOWN_SESSION,
                            f"session {sid} is {'closed' if record else 'unknown'}; "
                            "open it first")
        vid = record.verifier_id or self.registry.verifier_of(sid) or ""
        return self.registry.assign(sid, vid, now_ms(), spec=record.spec, vocab=record.vocab,
                                    prompt_len=record.prompt_len,
                                    committed_len=record.committed_len)

    def _keep_deadline(self, pending: PendingVerify) -> None:
        """Keep a round's deadline in wisp:deadlines without holding up the round (or the
        next submit: NATS runs this subscription's handlers one at a time). A retried round
        whose first deadline is there already gets that one back, and its verifier's policy
        looks again if the round is still queued."""
        task = asyncio.create_task(self._sync_deadline(pending))
        self._deadline_writes.add(task)
        task.add_done_callback(self._deadline_writes.discard)

    async def _sync_deadline(self, pending: PendingVerify) -> None:
        try:
            stored = await self._deadline(pending.request, pending.deadline_ms)
        except Exception as exc:  # noqa: BLE001 - the round goes on; a retry gets a new deadline
            log.warning("deadline_write_failed", sid=pending.sid, error=str(exc))
            return
        if stored != pending.deadline_ms:
            pending.deadline_ms = stored
            vid = self.registry.verifier_of(pending.sid)
            if vid is not None:
                await self._guard("deadline", lambda _: self._dispatch(vid))(None)

    async def _deadline(self, req: VerifyRequest, deadline: float) -> float:
        """`deadline` (arrival + budget - the device's downlink estimate, on this clock), or
        the deadline of the round's first submit when it is a retry (also after a scheduler
        restart), kept in wisp:deadlines."""
        member = deadline_member(req.sid, req.round)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(DEADLINES_KEY, {member: deadline}, nx=True)
            pipe.zscore(DEADLINES_KEY, member)
            _, stored = await pipe.execute()
        return float(stored) if stored is not None else deadline

    async def _on_done(self, msg: Msg) -> None:
        done = decode(BatchDone, msg.data)
        finished = self.registry.finish_batch(done.verifier_id, done.batch_id, done)
        if finished is None:
            return  # another scheduler's batch, or one re-run elsewhere after a death
        now = now_ms()
        self.counters["batches_done"] += 1
        self._room.set()
        await self._dispatch(done.verifier_id)
        met = 0
        for e in finished.entries:
            met += now <= e.deadline_ms
            self.registry.sessions.round_done(e.sid, e.request.round, now)
        missed = len(finished.entries) - met
        self.counters["deadlines_met"] += met
        self.counters["deadlines_missed"] += missed
        await publish_event(self.nc, ScheduleEvent(
            ts_ms=now, verifier_id=done.verifier_id, batch_id=done.batch_id,
            policy=finished.policy, size=len(finished.entries),
            predicted_ms=finished.predicted_ms, observed_ms=done.batch_ms,
            guard_ms=finished.guard_ms, decision_ms=finished.decision_ms, deadlines_met=met,
            deadlines_missed=missed, late_dispatched=finished.late))
        members = [deadline_member(*e.key) for e in finished.entries]
        await self.redis.zrem(DEADLINES_KEY, *members)

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode(Heartbeat, msg.data)
        now = now_ms()
        if not self.registry.heartbeat(hb, now):
            return
        log.info("verifier_joined", verifier=hb.verifier_id, model=hb.model,
                 hardware=hb.hardware, free_blocks=hb.free_blocks, total_blocks=hb.total_blocks,
                 k_max=hb.limits.k_max, max_context=hb.limits.max_context)
        _, moved = self.registry.place_orphans(now)
        await self._write_moves(moved)
        await self._dispatch_all()

    async def _on_generate(self, msg: Msg) -> None:
        req = decode(GenerateRequest, msg.data)
        if not msg.reply:
            raise WispError(ErrorCode.BAD_REQUEST, f"{SERVER_GENERATE} needs a reply inbox "
                            "(send it as a NATS request): the tokens stream there")
        if req.mode not in SERVER_MODES and not req.resume_sid:
            raise WispError(ErrorCode.BAD_REQUEST, f"mode {req.mode} is served by the "
                            f"edge-drafter on {GENERATE_EDGE}")
        if req.mode == "colocated" and not self.config.draft_model:
            raise WispError(ErrorCode.BAD_REQUEST,
                            "mode colocated needs a draft model on the scheduler; start the "
                            "admission-scheduler with --draft-model PATH (env WISP_DRAFT_MODEL)")
        if self._stopping:
            raise WispError(ErrorCode.CAPACITY, "this scheduler is shutting down; retry")
        if self._server is None:
            raise WispError(ErrorCode.UNAVAILABLE, self._server_unavailable)
        task = asyncio.create_task(self._server.serve(req, msg.reply),
                                   name=f"generate-{req.mode}")
        self._generations.add(task)
        task.add_done_callback(self._generations.discard)
        self.counters[f"generate.{req.mode}"] += 1

    # -- dispatch -----------------------------------------------------------------------------
    async def _dispatch(self, vid: str) -> None:
        """Send `vid` batches while it is live, has room for another in flight and its policy
        picks entries; arm the policy's wake-up for later."""
        while True:
            v = self.registry.verifiers.get(vid)
            if (v is None or not v.alive or not v.queue
                    or len(v.in_flight) >= self.config.max_batches_in_flight):
                return
            now = now_ms()
            policy = self._policy_for(v.queue)
            state = self.registry.state(vid)
            started = time.perf_counter()
            selection = policy.select(v.queue, now, state)
            decision_ms = (time.perf_counter() - started) * 1e3
            self._wake_at(vid, selection.wake_at_ms)
            chosen = selection.entries
            if not chosen:
                return
            batch_id = next(self._batch_ids)
            data = self._encode_batch(batch_id, chosen)
            while len(data) > self.nc.max_payload and len(chosen) > 1:
                chosen = chosen[: len(chosen) // 2]
                data = self._encode_batch(batch_id, chosen)
            batch = self.registry.start_batch(vid, batch_id, chosen, now)
            batch.policy, batch.decision_ms, batch.late = policy.name, decision_ms, selection.late
            batch.guard_ms, batch.kv_claim = state.guard_ms, kv_claim(chosen, state.block_size)
            if state.estimator is not None:
                batch.predicted_ms = state.estimator.predict(
                    BatchShape.of([(e.num_new, e.num_cached) for e in chosen]))
            self.counters["late_dispatched"] += selection.late
            if len(data) > self.nc.max_payload:  # one request alone is over the server's limit
                self.registry.finish_batch(vid, batch_id)
                await self._reject(chosen[0].reply_to, WispError(
                    ErrorCode.BAD_REQUEST, f"verify request is {len(data)} bytes, over this "
                    f"NATS server's max_payload ({self.nc.max_payload})"), "submit",
                    chosen[0].sid)
                continue
            try:
                await self.nc.publish(verifier_batch(vid), data)
            except Exception as exc:  # noqa: BLE001 - keep it queued; the check loop retries
                self.registry.abort_batch(vid, batch_id)
                log.error("batch_publish_failed", verifier=vid, error=str(exc))
                return
            self.counters["batches_sent"] += 1
            self.counters["batch_entries"] += len(chosen)
            log.debug("batch_sent", verifier=vid, batch_id=batch_id, size=len(chosen),
                      queue_depth=len(v.queue))

    def _policy_for(self, queue: list[PendingVerify]) -> BatchPolicy:
        """The configured policy; with "auto", the most deadline-aware policy among those of
        the queued sessions' modes."""
        if len(self.policies) == 1:
            return next(iter(self.policies.values()))
        names = {MODE_POLICIES.get(e.mode, "fcfs") for e in queue}
        for name in POLICY_PRECEDENCE:
            if name in names:
                return self.policies[name]
        return self.policies["fcfs"]

    def _wake_at(self, vid: str, at_ms: float | None) -> None:
        """Run `vid`'s dispatch again at `at_ms` (a policy's latest start time), replacing an
        earlier wake-up; None cancels it."""
        old = self._wakes.pop(vid, None)
        if old is not None:
            old.cancel()
        if at_ms is None:
            return
        delay_s = max(0.0, (at_ms - now_ms()) / 1e3)
        self._wakes[vid] = asyncio.get_running_loop().call_later(delay_s, self._woken_up, vid)

    def _woken_up(self, vid: str) -> None:
        self._wakes.pop(vid, None)
        task = asyncio.create_task(self._guard("wake", lambda _: self._dispatch(vid))(None))
        self._woken.add(task)
        task.add_done_callback(self._woken.discard)

    @staticmethod
    def _encode_batch(batch_id: str, entries: list[PendingVerify]) -> bytes:
        return encode(VerifierBatch(batch_id=batch_id, items=[
            BatchEntry(request=e.request, reply_to=e.reply_to) for e in entries]))

    async def _dispatch_all(self) -> None:
        for vid in self.registry.dispatchable(self.config.max_batches_in_flight):
            await self._dispatch(vid)

    # -- periodic checks ----------------------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await self._check(now_ms())
            except Exception:  # noqa: BLE001 - Redis hiccups etc.: try again next tick
                log.exception("check_failed")

    async def _check(self, now: float) -> None:
        for vid, reason in self.registry.timed_out(now):
            death = self.registry.declare_dead(vid, reason, now)
            self.counters["verifiers_dead"] += 1
            log.warning("verifier_dead", verifier=vid, reason=reason,
                        sessions_moved=len(death.moved_sessions), requeued=death.num_requeued,
                        orphaned=death.num_orphaned)
            await self._write_moves(death.moved_sessions)
        if self.registry.orphans:
            _, moved = self.registry.place_orphans(now)
            await self._write_moves(moved)
        for entry in self.registry.expire(now, self.config.batch_timeout_s * 1e3):
            await self._reject(entry.reply_to, WispError(
                ErrorCode.CAPACITY, f"no verifier ran this round within "
                f"{self.config.batch_timeout_s:g} s (no verifier is available); retry later"),
                "submit", entry.sid)
            await self.redis.zrem(DEADLINES_KEY, deadline_member(*entry.key))
        await self._dispatch_all()
        if now - self._last_sweep_ms > SWEEP_INTERVAL_S * 1e3:
            self._last_sweep_ms = now
            self.registry.forget_idle(now, SESSION_TTL_S * 1e3)
            await self.redis.zremrangebyscore(DEADLINES_KEY, "-inf",
                                              now - DEADLINE_RETENTION_MS)

    async def _write_moves(self, moved: dict[str, str]) -> None:
        """Record new placements in Redis (`verifier_id` of each session that still exists)."""
        await asyncio.gather(*(self.store.set_fields(sid, verifier_id=vid)
                               for sid, vid in moved.items()))

    # -- errors and events --------------------------------------------------------------------
    async def _reject(self, reply_to: str | None, err: WispError, what: str,
                      sid: str | None = None) -> None:
        self.counters[f"error.{err.code}"] += 1
        log.warning("request_rejected", handler=what, code=str(err.code), reason=err.message,
                    **({"sid": sid} if sid else {}))
        if reply_to:
            await self._publish(reply_to, error_reply(err))
        await publish_event(self.nc, ErrorEvent(ts_ms=now_ms(), service=SERVICE_NAME,
                                                code=str(err.code), sid=sid))
        if what == "generate":  # refused before serving: the metrics count every refusal
            await publish_refusal(self.nc, err, sid=sid)

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - a closed connection must not crash handlers
            log.error("publish_failed", subject=subject, error=str(exc))

    # -- server-side modes --------------------------------------------------------------------
    async def _load_server_side(self) -> None:
        """Tokenizer (and draft model, when configured) for `wisp.server.generate`. Without a
        target model the scheduler still routes rounds; with a draft model configured, a
        failure to load it is fatal (the operator asked for colocated). `centralized` needs
        only the target's tokenizer: torch is imported for `colocated` alone."""
        cfg = self.config
        if not cfg.target_model:
            self._server_unavailable = ("server-side modes are off: start the "
                                        "admission-scheduler with --target-model PATH")
            return
        try:
            loaded = await asyncio.to_thread(_load_server_models, cfg)
        except Exception as exc:
            if cfg.draft_model:
                raise
            self._server_unavailable = (f"server-side modes are unavailable: cannot load "
                                        f"the tokenizer of {cfg.target_model!r} ({exc})")
            log.warning("server_side_modes_unavailable", reason=str(exc))
            return
        from common.transport.generation import GenerationServer

        self._server = GenerationServer(
            nc=self.nc, store=self.store, tokenizer=loaded.tokenizer,
            eos_token_id=loaded.eos_token_id, limits=loaded.limits,
            modes=SERVER_MODES if loaded.drafter is not None else ("centralized",),
            device_id=SERVER_DEVICE_ID, drafter=loaded.drafter, policies=loaded.policies,
            default_k_max=cfg.default_k_max,
            elsewhere={m: GENERATE_EDGE for m in MODES if m not in SERVER_MODES})


def _is_transient(exc: BaseException) -> bool:
    """A connection to Redis or NATS lost or timed out (retrying can succeed)."""
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                      | nats.errors.ConnectionClosedError | nats.errors.TimeoutError
                      | ConnectionError | TimeoutError)


@dataclass(slots=True)
class _ServerModels:
    tokenizer: Any
    eos_token_id: int | None
    limits: ModelLimits
    drafter: Any = None  # DraftBatcher over the colocated draft model
    policies: Any = None  # PolicyCatalog


def _load_server_models(cfg: SchedulerConfig) -> _ServerModels:
    """The target's tokenizer and limits, and the colocated drafter when configured; runs in
    a thread."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from common.models.vocab import eos_token_id, vocab_info

    if not Path(cfg.target_model).exists():
        raise FileNotFoundError(f"{cfg.target_model!r} is not a local folder")
    tokenizer = AutoTokenizer.from_pretrained(cfg.target_model, local_files_only=True)
    model_config = AutoConfig.from_pretrained(cfg.target_model, local_files_only=True)
    eos = eos_token_id(model_config, tokenizer)
    vocab = vocab_info(int(model_config.vocab_size), tokenizer, eos)
    context = int(getattr(model_config, "max_position_embeddings", 2048))
    limits = ModelLimits(vocab=vocab, k_max=max(DRAFTER_K_MAX, cfg.default_k_max),
                         max_context=context,
                         max_prompt_tokens=cfg.max_prompt_tokens or context // 2)
    loaded = _ServerModels(tokenizer, eos, limits)
    if cfg.draft_model:
        from common.engine.draft_batcher import DraftBatcher
        from common.engine.drafter import DrafterCore
        from common.engine.policies import PolicyCatalog
        from common.models.loading import VocabularyMismatch, load_model
        from common.models.runner_factory import make_runner

        draft = load_model(cfg.draft_model)
        if draft.vocab_info != vocab:
            raise VocabularyMismatch(f"draft model {cfg.draft_model!r} and target model "
                                     f"{cfg.target_model!r} do not share a vocabulary")
        loaded.drafter = DraftBatcher(DrafterCore(make_runner(draft.model), draft.eos_token_id,
                                                  k_max=limits.k_max))
        loaded.policies = PolicyCatalog.standard(("colocated",))
    return loaded
