"""gpu-verifier service: NATS batches in, one `VerifierCore.verify_batch` per batch, results out.

Transport and orchestration only (docs/services.md "One round" step 4): batches run one at a
time through a local queue and one worker task, model work in a thread so heartbeats keep
flowing during a forward pass; every round is committed to Redis before its result is sent.
The model math lives in `core.py`, the Redis ↔ core session loading in `sessions.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import structlog
import torch
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from common.config import BaseConfig
from common.errors import ErrorCode, WispError
from common.models.loading import DEFAULT_TARGET, LoadedModel, load_model
from common.models.paged_runner import PagedRunner
from common.models.runner_factory import make_runner
from common.protocol import (
    MAX_BATCH_ENTRIES,
    MAX_DRAFT_TOKENS,
    MAX_PAYLOAD_BYTES,
    BatchDone,
    BatchEntry,
    Event,
    Heartbeat,
    SessionClose,
    VerifierBatch,
    VerifyResult,
    decode,
    encode,
    error_reply,
    from_dict,
)
from common.service import Service
from common.store import SessionStore, now_ms
from common.subjects import (
    EVENT_BATCH,
    SESSION_CLOSE,
    VERIFIER_HEARTBEAT,
    VERIFIERS_KEY,
    check_token,
    event,
    is_publish_subject,
    is_safe_token,
    to_name,
    verifier_batch,
    verifier_done,
)
from services.gpu_verifier.core import VerifierCore, VerifyOutcome
from services.gpu_verifier.sessions import commit_round, ensure_sessions

log = structlog.get_logger(__name__)

_REDIS_CONCURRENCY = 32  # commits of one batch in flight at once


@dataclass(slots=True)
class VerifierConfig(BaseConfig):
    """gpu-verifier: runs the target model over the batches the scheduler sends it."""

    verifier_id: str = field(default_factory=lambda: "v-" + secrets.token_hex(4))
    target_model: str = DEFAULT_TARGET
    device: str = "auto"
    dtype: str = ""  # "": bf16 on CUDA, fp32 on CPU
    k_max: int = 8
    kv_budget_mb: int = 256
    block_size: int = 16
    heartbeat_s: float = 1.0
    max_prompt_tokens: int = 0  # 0: the core's default (half the context)

    def __post_init__(self) -> None:
        check_token(self.verifier_id, "verifier_id")
        if not 1 <= self.k_max <= MAX_DRAFT_TOKENS:
            raise ValueError(f"k_max must be in [1, {MAX_DRAFT_TOKENS}], got {self.k_max}")
        if self.kv_budget_mb < 1 or self.block_size < 1:
            raise ValueError("kv_budget_mb and block_size must be >= 1")
        if not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_tokens must be >= 0 (0: the core's default)")


@dataclass(slots=True)
class _Shape:
    """What one batch cost and looked like (estimator features, DESIGN.md §6)."""

    batch_ms: float = 0.0  # wall time of the core call
    num_linear: int = 0  # Σ new tokens fed
    num_interactions: int = 0  # Σ new × (cached + new)
    num_cached: int = 0  # Σ cached tokens read

    def add(self, outcome: VerifyOutcome) -> None:
        new, cached = outcome.num_input_tokens, outcome.num_cached_tokens
        self.num_linear += new
        self.num_interactions += new * (cached + new)
        self.num_cached += cached


# (batch_id if readable, valid entries, [(reply_to, error)] of invalid ones, number of entries)
_Decoded = tuple[str | None, list[BatchEntry], list[tuple[str, WispError]], int]


class VerifierService(Service):
    name = "gpu-verifier"

    def __init__(self, config: VerifierConfig, model: LoadedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.vid = config.verifier_id
        self.model = model  # injected (tests, in-process) or loaded in start()
        self.core: VerifierCore | None = None
        self.store: SessionStore | None = None
        self.counters: Counter[str] = Counter()  # batches, bad_batches, error:<code>, ...
        self._queue: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()
        self._core_lock = asyncio.Lock()  # the core is driven by one batch or close at a time
        self._batch_sub: Subscription | None = None
        self._close_sub: Subscription | None = None
        self._worker: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self._hardware = "cpu"
        self._ready = False

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, cfg.target_model, cfg.device,
                                                 cfg.dtype or None)
        runner = await asyncio.to_thread(make_runner, self.model.model,
                                         kv_budget_bytes=cfg.kv_budget_mb << 20,
                                         block_size=cfg.block_size)
        self.core = VerifierCore(runner, self.model.eos_token_id, cfg.k_max,
                                 cfg.max_prompt_tokens or None)
        self._hardware = _hardware_name(self.model.device)
        self.store = SessionStore(self.redis)
        self._worker = asyncio.create_task(self._work(), name=f"{self.vid}-worker")
        self._batch_sub = await self.nc.subscribe(verifier_batch(self.vid), cb=self._on_batch)
        # No queue group: every replica frees its KV for a closed session.
        self._close_sub = await self.nc.subscribe(SESSION_CLOSE, cb=self._on_close)
        await self.nc.flush()
        self._ready = True
        self._heartbeats = asyncio.create_task(self._heartbeat_loop(),
                                               name=f"{self.vid}-heartbeat")
        log.info("verifier_ready", verifier_id=self.vid, model=self.model.name,
                 hardware=self._hardware, k_max=cfg.k_max)

    async def stop(self) -> None:
        """Stop taking batches, finish the queued ones, then leave the registry."""
        self._ready = False
        try:
            if self._batch_sub is not None:
                with contextlib.suppress(Exception):
                    await self._batch_sub.drain()  # batches already delivered still get queued
            if self._worker is not None:
                self._queue.put_nowait(None)
                await self._worker
            if self._close_sub is not None:
                with contextlib.suppress(Exception):
                    await self._close_sub.unsubscribe()
        finally:
            if self._heartbeats is not None:
                self._heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeats
            with contextlib.suppress(Exception):
                await self.redis.hdel(VERIFIERS_KEY, self.vid)
        log.info("verifier_stopped", verifier_id=self.vid, **dict(self.counters))

    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        """Batches received and not yet started."""
        return self._queue.qsize()

    # -- NATS callbacks ---------------------------------------------------------------------
    async def _on_batch(self, msg: Msg) -> None:
        self.counters["batches_received"] += 1
        self._queue.put_nowait((msg.data, time.perf_counter()))

    async def _on_close(self, msg: Msg) -> None:
        try:
            sid = decode(SessionClose, msg.data).sid
        except WispError as err:
            self.counters["bad_session_close"] += 1
            log.warning("bad_session_close", reason=err.message)
            return
        async with self._core_lock:
            if sid in self.core.sessions:
                self.core.close_session(sid)
                log.info("session_freed", sid=sid)

    # -- batches ----------------------------------------------------------------------------
    async def _work(self) -> None:
        while (job := await self._queue.get()) is not None:
            data, arrived = job
            try:
                await self._run_batch(data, arrived)
            except Exception:  # never let one batch kill the worker
                self.counters["batch_failures"] += 1
                log.exception("batch_failed")

    async def _run_batch(self, data: bytes, arrived: float) -> None:
        queue_ms = (time.perf_counter() - arrived) * 1e3
        batch_id, entries, rejected, size = self._decode_batch(data)
        shape = _Shape()
        try:
            for reply_to, err in rejected:
                await self._reply_error(reply_to, err, None)
            if entries:
                async with self._core_lock:
                    shape = await self._verify(entries, queue_ms, size)
        finally:
            if batch_id is not None:  # the scheduler's verifier is free again, whatever happened
                await self._publish_done(batch_id, size, shape)

    def _decode_batch(self, data: bytes) -> _Decoded:
        """(batch_id, entries, [(reply_to, error)], size). A batch that fails validation is
        salvaged entry by entry, so its valid entries are served, its invalid ones refused,
        and the scheduler still gets its BatchDone when the batch id is readable."""
        try:
            batch = decode(VerifierBatch, data)
            self.counters["batches"] += 1
            return batch.batch_id, batch.items, [], len(batch.items)
        except WispError as err:
            self.counters["bad_batches"] += 1
            log.warning("bad_batch", reason=err.message)
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True) \
                if len(data) <= MAX_PAYLOAD_BYTES else None
        except Exception:
            raw = None
        if not isinstance(raw, dict):
            return None, [], [], 0
        batch_id = raw.get("batch_id") if is_safe_token(raw.get("batch_id")) else None
        items = raw.get("items")
        items = items[:MAX_BATCH_ENTRIES] if isinstance(items, list) else []
        entries: list[BatchEntry] = []
        rejected: list[tuple[str, WispError]] = []
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise WispError(ErrorCode.BAD_REQUEST, "batch entry is not a map")
                entries.append(from_dict(BatchEntry, {**item, "v": 1}))
            except WispError as err:
                reply_to = item.get("reply_to") if isinstance(item, dict) else None
                if is_publish_subject(reply_to):
                    rejected.append((reply_to, err))
        return batch_id, entries, rejected, len(items)

    async def _verify(self, entries: list[BatchEntry], queue_ms: float, size: int) -> _Shape:
        """Load what the core lacks, run one core call, commit and answer every entry."""
        requests = [e.request for e in entries]
        outcomes: list[VerifyOutcome | WispError | None]
        try:
            outcomes = list(await ensure_sessions(self.core, self.store, requests))
        except Exception:
            log.exception("session_load_failed")
            outcomes = [WispError(ErrorCode.INTERNAL, "session store unavailable; retry the round")
                        for _ in requests]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        # A round the core answers from memory (a retry) costs no forward pass.
        replays = {i for i in todo
                   if self.core.sessions[requests[i].sid].last_round == requests[i].round}
        shape = _Shape()
        if todo:
            items = [requests[i].to_item() for i in todo]
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.core.verify_batch, items)
            except Exception:
                log.exception("verify_batch_failed", size=len(items))
                for i in todo:  # their core state is unknown now: rebuild from Redis next time
                    self.core.close_session(requests[i].sid)
                results = [WispError(ErrorCode.INTERNAL, "verification failed; retry the round")
                           for _ in todo]
            shape.batch_ms = (time.perf_counter() - started) * 1e3
            for i, result in zip(todo, results, strict=True):
                outcomes[i] = result
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, VerifyOutcome) and i not in replays:
                shape.add(outcome)
        limit = asyncio.Semaphore(_REDIS_CONCURRENCY)

        async def answer(entry: BatchEntry, outcome: VerifyOutcome | WispError) -> None:
            async with limit:
                await self._answer(entry, outcome, queue_ms, shape.batch_ms, size)

        await asyncio.gather(*(answer(e, o) for e, o in zip(entries, outcomes, strict=True)))
        return shape

    async def _answer(self, entry: BatchEntry, outcome: VerifyOutcome | WispError,
                      queue_ms: float, batch_ms: float, size: int) -> None:
        """Commit (before replying, always), then reply to the entry's inbox."""
        sid = entry.request.sid
        with structlog.contextvars.bound_contextvars(sid=sid, round=entry.request.round):
            if isinstance(outcome, WispError):
                await self._reply_error(entry.reply_to, outcome, sid)
                return
            try:
                result = VerifyResult.from_outcome(outcome, queue_ms, batch_ms, size)
                payload, status = await commit_round(self.core, self.store, entry.request,
                                                     outcome, encode(result))
            except WispError as err:
                await self._reply_error(entry.reply_to, err, sid)
                return
            except Exception:
                log.exception("commit_failed")
                self.core.close_session(sid)  # the core ran ahead of Redis
                await self._reply_error(entry.reply_to, WispError(
                    ErrorCode.INTERNAL, "could not commit the round; retry it"), sid)
                return
            self.counters[f"commit:{status.name.lower()}"] += 1
            try:
                await self.nc.publish(entry.reply_to, payload)
            except Exception:  # committed: a retry of the round gets the stored result
                log.exception("reply_failed")

    async def _reply_error(self, reply_to: str, err: WispError, sid: str | None) -> None:
        self.counters[f"error:{err.code}"] += 1
        log.warning("verify_error", code=str(err.code), reason=err.message)
        try:
            await self.nc.publish(reply_to, error_reply(err))
            await self.nc.publish(event("error"), encode(Event(
                kind="error", ts_ms=now_ms(), sid=sid,
                fields={"service": self.name, "code": str(err.code)})))
        except Exception:
            log.exception("reply_failed")

    async def _publish_done(self, batch_id: str, size: int, shape: _Shape) -> None:
        done = BatchDone(verifier_id=self.vid, batch_id=batch_id, batch_ms=shape.batch_ms,
                         size=size, num_linear=shape.num_linear,
                         num_interactions=shape.num_interactions, num_cached=shape.num_cached)
        await self.nc.publish(verifier_done(self.vid), encode(done))
        fields = {"verifier_id": self.vid, "size": size, "batch_ms": shape.batch_ms,
                  "num_linear": shape.num_linear, "num_interactions": shape.num_interactions,
                  "num_cached": shape.num_cached, "queue_depth": self.queue_depth}
        await self.nc.publish(event(EVENT_BATCH), encode(Event(kind=EVENT_BATCH,
                                                               ts_ms=now_ms(), fields=fields)))

    # -- heartbeats -------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        runner = self.core.runner
        blocks = runner.blocks if isinstance(runner, PagedRunner) else None
        return Heartbeat(verifier_id=self.vid, model=to_name(self.model.name),
                         hardware=self._hardware,
                         free_blocks=blocks.num_free_blocks if blocks else 0,
                         total_blocks=blocks.num_blocks if blocks else 0,
                         num_sessions=len(self.core.sessions), ts_ms=now_ms())

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                payload = encode(self.heartbeat())
                await self.nc.publish(VERIFIER_HEARTBEAT, payload)
                await self.redis.hset(VERIFIERS_KEY, self.vid, payload)
            except Exception:
                log.warning("heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.config.heartbeat_s)


def _hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return to_name(torch.cuda.get_device_name(device))
    return device.type
