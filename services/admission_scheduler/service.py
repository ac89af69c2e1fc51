"""The admission-scheduler: sessions in, verify requests batched out to the verifiers.

Transport around two pure modules (docs/services.md, "One round" and "Failure handling"):
`registry.VerifierRegistry` (liveness, placement, queues, in-flight batches) and a
`batching.BatchPolicy` (which queued requests run next). This module decodes, validates,
writes Redis, publishes batches, and turns every problem into an error reply, a log line, a
counter and an `error` event; it never dies on bad input.

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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from common.config import BaseConfig
from common.errors import ErrorCode, WispError
from common.protocol import (
    MAX_BATCH_ENTRIES,
    MAX_DRAFT_TOKENS,
    BatchDone,
    BatchEntry,
    Event,
    GenerateRequest,
    Heartbeat,
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
from common.service import Service
from common.store import SESSION_TTL_S, SessionRecord, SessionStore, now_ms
from common.subjects import (
    DEADLINES_KEY,
    SCHEDULER_QUEUE,
    SERVER_GENERATE,
    SESSION_CLOSE,
    SESSION_OPEN,
    SUBJECT_PREFIX,
    VERIFIER_HEARTBEAT,
    VERIFY_SUBMIT,
    deadline_member,
    event,
    verifier_batch,
)
from services.admission_scheduler.batching import POLICIES, PendingVerify, make_policy
from services.admission_scheduler.registry import VerifierRegistry

log = structlog.get_logger(__name__)

SERVICE_NAME = "admission-scheduler"
SERVER_MODES = ("centralized", "colocated")
VERIFIER_DONE_ALL = f"{SUBJECT_PREFIX}.verifier.*.done"
CHECK_INTERVAL_S = 0.25  # liveness, batch timeouts, expiry, orphan placement
SWEEP_INTERVAL_S = 60.0  # forget idle sessions, trim stale deadline members
DEADLINE_RETENTION_MS = 600_000.0  # members this far past their deadline are leftovers
SERVER_DEVICE_ID = "server"  # device id of server-side (centralized/colocated) sessions
DRAFTER_K_MAX = 16  # the server drafter's upper bound on k (a session may ask for less)

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
    policy: str = "fcfs"
    default_k_max: int = 8  # server-side modes, when the request gives none
    max_prompt_tokens: int = 0  # 0: half the target's context, as the verifier core uses
    draft_model: str = ""  # "" disables the colocated mode
    target_model: str = field(default_factory=_default_target)  # tokenizer of server-side modes
    downlink_ms: float = 0.0  # downlink estimate subtracted from edge budgets

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout_s", "batch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 1 <= self.max_batch_size <= MAX_BATCH_ENTRIES:
            raise ValueError(f"max_batch_size must be within [1, {MAX_BATCH_ENTRIES}], "
                             f"got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of "
                             f"{', '.join(sorted(POLICIES))}")
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
        # Resolved at start from the target model when the config leaves it at 0.
        self.max_prompt_tokens = config.max_prompt_tokens
        self.policy = make_policy(config.policy, max_batch_size=config.max_batch_size,
                                  max_batch_tokens=config.max_batch_tokens)
        self.registry = VerifierRegistry(config.heartbeat_timeout_s, config.batch_timeout_s,
                                         now_ms())
        self.counters: Counter[str] = Counter()
        self.store: SessionStore | None = None
        self._subs: dict[str, Subscription] = {}
        self._generations: set[asyncio.Task] = set()
        self._check_task: asyncio.Task | None = None
        self._batch_ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count())
        self._last_sweep_ms = 0.0
        self._ready = False
        self._stopping = False
        self._generation_ctx: Any = None  # common.generation.GenerationContext once loaded
        self._generation_unavailable = "server-side modes are still loading"

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
        log.info("scheduler_started", policy=self.policy.name,
                 server_side=self._generation_ctx is not None,
                 colocated=bool(self.config.draft_model))

    async def stop(self) -> None:
        """Stop taking sessions and generations, let server-side generations finish (their
        rounds still go through this scheduler), then stop taking rounds and run what is
        queued and in flight. The caller bounds the whole (drain_timeout_s)."""
        self._stopping = True
        try:
            await self._unsubscribe("open", "generate")
            if self._generations:
                await asyncio.gather(*self._generations, return_exceptions=True)
            await self._unsubscribe("submit")
            while self.registry.has_pending_work():
                await asyncio.sleep(0.05)
        finally:
            for task in self._generations:
                task.cancel()
            if self._check_task is not None:
                self._check_task.cancel()
            drafter = getattr(self._generation_ctx, "drafter", None)
            if drafter is not None:
                drafter.close()
        await self._unsubscribe("heartbeat", "done", "close")
        log.info("scheduler_stopped", counters=dict(self.counters))

    def ready(self) -> bool:
        # No verifier is not "unready": open answers CAPACITY until one says hello.
        return self._ready and not self._stopping

    def routes(self) -> list[web.RouteDef]:
        async def verifiers(_: web.Request) -> web.Response:
            snapshot = self.registry.snapshot(now_ms())
            snapshot["counters"] = dict(self.counters)
            return web.json_response(snapshot)

        return [web.get("/verifiers", verifiers)]

    async def _unsubscribe(self, *keys: str) -> None:
        for key in keys:
            sub = self._subs.pop(key, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # -- handlers -----------------------------------------------------------------------------
    def _guard(self, what: str, handler: Handler) -> Handler:
        """Turn whatever `handler` raises into an error reply; never let it escape."""

        async def run(msg: Msg) -> None:
            try:
                await handler(msg)
            except WispError as err:
                sid = structlog.contextvars.get_contextvars().get("sid")
                await self._reject(msg.reply or None, err, what, sid)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the service
                log.exception("handler_failed", handler=what)
                sid = structlog.contextvars.get_contextvars().get("sid")
                await self._reject(msg.reply or None, WispError(
                    ErrorCode.INTERNAL, f"{what}: {type(exc).__name__}: {exc}"), what, sid)
            finally:
                structlog.contextvars.unbind_contextvars("sid")

        return run

    async def _on_open(self, msg: Msg) -> None:
        req = decode(SessionOpen, msg.data)
        structlog.contextvars.bind_contextvars(sid=req.sid)
        limit = self.max_prompt_tokens
        if limit and len(req.prompt_ids) > limit:
            raise WispError(ErrorCode.PROMPT_TOO_LONG,
                            f"prompt has {len(req.prompt_ids)} tokens; the limit is {limit}")
        vid = self.registry.pick()
        if vid is None:
            raise WispError(ErrorCode.CAPACITY, "no verifier is available; retry later")
        now = now_ms()
        self.registry.assign(req.sid, vid, now)
        record = SessionRecord(
            sid=req.sid, mode=req.mode, prompt_len=len(req.prompt_ids),
            max_new_tokens=req.max_new_tokens, verifier_id=vid,
            temperature=req.sampling.temperature, top_p=req.sampling.top_p,
            top_k=req.sampling.top_k, draft_top_m=req.sampling.draft_top_m,
            seed=-1 if req.seed is None else req.seed, k_max=req.k_max,
            slo_ttft_ms=req.slo.ttft_ms if req.slo else 0.0,
            slo_tpot_ms=req.slo.tpot_ms if req.slo else 0.0,
            device_id=req.device_id, created_ms=now, tokens=list(req.prompt_ids))
        try:
            await self.store.create(record)
        except BaseException:
            self.registry.forget(req.sid)
            raise
        self.counters["sessions_opened"] += 1
        log.info("session_opened", verifier=vid, mode=req.mode,
                 prompt_tokens=len(req.prompt_ids))
        if msg.reply:
            await self._publish(msg.reply, encode(SessionOpened(
                sid=req.sid, verifier_id=vid, committed_len=len(req.prompt_ids))))

    async def _on_close(self, msg: Msg) -> None:
        req = decode(SessionClose, msg.data)
        structlog.contextvars.bind_contextvars(sid=req.sid)
        await self.store.close(req.sid)  # a no-op for a session that is already gone
        self.registry.forget(req.sid)
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
        if self.registry.verifier_of(req.sid) is None:
            record = await self.store.load(req.sid)
            if record is None or record.state == "closed":
                raise WispError(ErrorCode.UNKNOWN_SESSION,
                                f"session {req.sid} is {'closed' if record else 'unknown'}; "
                                "open it first")
            if record.verifier_id:
                self.registry.assign(req.sid, record.verifier_id, now_ms())
        arrival = now_ms()
        deadline = arrival + req.budget_ms - self.config.downlink_ms
        await self.redis.zadd(DEADLINES_KEY, {deadline_member(req.sid, req.round): deadline})
        entry = PendingVerify(request=req, reply_to=msg.reply, arrival_ms=arrival,
                              deadline_ms=deadline)
        vid, moved = self.registry.enqueue(entry, arrival)
        self.counters["verify_requests"] += 1
        if moved:
            log.warning("session_moved", to=moved[req.sid], reason="verifier not live")
            await self._write_moves(moved)
        if vid is None:
            log.info("queued_without_verifier", round=req.round)
            return
        await self._dispatch(vid)

    async def _on_done(self, msg: Msg) -> None:
        done = decode(BatchDone, msg.data)
        finished = self.registry.finish_batch(done.verifier_id, done.batch_id, done)
        if finished is None:
            return  # another scheduler's batch, or one re-run elsewhere after a death
        self.counters["batches_done"] += 1
        await self._dispatch(done.verifier_id)
        members = [deadline_member(e.sid, e.request.round) for e in finished.entries]
        await self.redis.zrem(DEADLINES_KEY, *members)

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode(Heartbeat, msg.data)
        now = now_ms()
        if not self.registry.heartbeat(hb, now):
            return
        log.info("verifier_joined", verifier=hb.verifier_id, model=hb.model,
                 hardware=hb.hardware, free_blocks=hb.free_blocks, total_blocks=hb.total_blocks)
        _, moved = self.registry.place_orphans(now)
        await self._write_moves(moved)
        await self._dispatch_all()

    async def _on_generate(self, msg: Msg) -> None:
        req = decode(GenerateRequest, msg.data)
        if not msg.reply:
            raise WispError(ErrorCode.BAD_REQUEST, f"{SERVER_GENERATE} needs a reply inbox "
                            "(send it as a NATS request): the tokens stream there")
        if req.mode not in SERVER_MODES:
            raise WispError(ErrorCode.BAD_REQUEST, f"mode {req.mode} is served by the "
                            "edge-drafter on wisp.edge.generate")
        if req.mode == "colocated" and not self.config.draft_model:
            raise WispError(ErrorCode.BAD_REQUEST,
                            "mode colocated needs a draft model on the scheduler; start the "
                            "admission-scheduler with --draft-model PATH (env WISP_DRAFT_MODEL)")
        if self._stopping:
            raise WispError(ErrorCode.CAPACITY, "this scheduler is shutting down; retry")
        if self._generation_ctx is None:
            raise WispError(ErrorCode.INTERNAL, self._generation_unavailable)
        from common.generation import run_generation

        task = asyncio.create_task(run_generation(self._generation_ctx, req, msg.reply),
                                   name=f"generate-{req.mode}")
        self._generations.add(task)
        task.add_done_callback(self._generations.discard)
        self.counters[f"generate.{req.mode}"] += 1

    # -- dispatch -----------------------------------------------------------------------------
    async def _dispatch(self, vid: str) -> None:
        """Send `vid` its next batch if it is live, idle and has work (one batch in flight)."""
        v = self.registry.verifiers.get(vid)
        if v is None or not v.alive or v.in_flight is not None or not v.queue:
            return
        now = now_ms()
        chosen = self.policy.select(v.queue, now, v.state())
        if not chosen:
            return
        batch_id = next(self._batch_ids)
        data = self._encode_batch(batch_id, chosen)
        while len(data) > self.nc.max_payload and len(chosen) > 1:
            chosen = chosen[: len(chosen) // 2]
            data = self._encode_batch(batch_id, chosen)
        self.registry.start_batch(vid, batch_id, chosen, now)
        if len(data) > self.nc.max_payload:  # one request alone is over the server's limit
            self.registry.finish_batch(vid, batch_id)
            await self._reject(chosen[0].reply_to, WispError(
                ErrorCode.BAD_REQUEST, f"verify request is {len(data)} bytes, over this NATS "
                f"server's max_payload ({self.nc.max_payload})"), "submit", chosen[0].sid)
            await self._dispatch(vid)
            return
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

    @staticmethod
    def _encode_batch(batch_id: str, entries: list[PendingVerify]) -> bytes:
        return encode(VerifierBatch(batch_id=batch_id, items=[
            BatchEntry(request=e.request, reply_to=e.reply_to, deadline_ms=e.deadline_ms)
            for e in entries]))

    async def _dispatch_all(self) -> None:
        for vid in self.registry.dispatchable():
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
        fields: dict[str, Any] = {"service": SERVICE_NAME, "code": str(err.code)}
        await self._publish(event("error"), encode(Event(kind="error", ts_ms=now_ms(),
                                                         sid=sid, fields=fields)))

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - a closed connection must not crash handlers
            log.error("publish_failed", subject=subject, error=str(exc))

    # -- server-side modes --------------------------------------------------------------------
    async def _load_server_side(self) -> None:
        """Tokenizer (and draft model, when configured) for `wisp.server.generate`. Without a
        target model the scheduler still routes rounds; with a draft model configured, a
        failure to load it is fatal (the operator asked for colocated)."""
        cfg = self.config
        if not cfg.target_model:
            self._generation_unavailable = ("server-side modes are off: start the "
                                            "admission-scheduler with --target-model PATH")
            return
        try:
            tokenizer, eos, vocab_size, context, drafter_core = await asyncio.to_thread(
                _load_generation_models, cfg)
        except Exception as exc:
            if cfg.draft_model:
                raise
            self._generation_unavailable = (f"server-side modes are unavailable: cannot load "
                                            f"the tokenizer of {cfg.target_model!r} ({exc})")
            log.warning("server_side_modes_unavailable", reason=str(exc))
            return
        from common.draft_batcher import DraftBatcher
        from common.generation import GenerationContext

        self.max_prompt_tokens = cfg.max_prompt_tokens or context // 2

        self._generation_ctx = GenerationContext(
            nc=self.nc, store=self.store, tokenizer=tokenizer,
            drafter=DraftBatcher(drafter_core) if drafter_core is not None else None,
            device_id=SERVER_DEVICE_ID, eos_token_id=eos, default_k_max=cfg.default_k_max,
            modes=SERVER_MODES, vocab_size=vocab_size, max_prompt_tokens=self.max_prompt_tokens)


def _load_generation_models(cfg: SchedulerConfig) -> tuple[Any, int | None, int, int, Any]:
    """(target tokenizer, eos id, vocab size, context length, DrafterCore or None); runs in
    a thread."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from common.models.loading import eos_token_id

    if not Path(cfg.target_model).exists():
        raise FileNotFoundError(f"{cfg.target_model!r} is not a local folder")
    tokenizer = AutoTokenizer.from_pretrained(cfg.target_model, local_files_only=True)
    model_config = AutoConfig.from_pretrained(cfg.target_model, local_files_only=True)
    eos = eos_token_id(model_config, tokenizer)
    vocab_size = int(model_config.vocab_size)
    core = None
    if cfg.draft_model:
        from common.models.loading import check_same_vocabulary, load_model
        from common.models.runner_factory import make_runner
        from services.edge_drafter.core import DrafterCore

        draft = load_model(cfg.draft_model)
        target = SimpleNamespace(name=cfg.target_model, vocab_size=vocab_size,
                                 tokenizer=tokenizer, eos_token_id=eos)
        check_same_vocabulary(draft, target)
        core = DrafterCore(make_runner(draft.model), draft.eos_token_id,
                           k_max=max(DRAFTER_K_MAX, cfg.default_k_max))
    context = int(getattr(model_config, "max_position_embeddings", 2048))
    return tokenizer, eos, vocab_size, context, core
