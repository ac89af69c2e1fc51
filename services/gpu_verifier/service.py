"""gpu-verifier service: NATS batches in, one `VerifierCore.verify_batch` per batch, results out.

Transport and orchestration only. Batches run one at a time through a local queue and one
worker task; model work runs in a thread so heartbeats keep flowing during a forward pass.
For each batch the worker checks every entry against this model's limits (the boundary), loads
what the core lacks from Redis, runs the forward pass, and at once sends `BatchDone` (the batch
time is the forward's alone, and the scheduler may send the next batch); the commits to Redis
and the replies of a batch then overlap with the next batch's forward. Every round is
committed before its result is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from common.config import BaseConfig
from common.engine.calibrate import QUICK_GRID, calibrate, hardware_name
from common.engine.estimator import LatencyEstimator
from common.engine.verifier import Verified, VerifierCore
from common.errors import ErrorCode, WispError
from common.limits import check_draft
from common.models.loading import DEFAULT_TARGET, LoadedModel, load_model
from common.models.paged_runner import PagedRunner
from common.models.runner_factory import make_runner
from common.protocol import (
    MAX_BATCH_ENTRIES,
    MAX_DRAFT_TOKENS,
    BatchDone,
    BatchEntry,
    BatchEvent,
    ErrorEvent,
    EstimatorCoefficients,
    Heartbeat,
    ModelLimits,
    SessionClose,
    SessionLength,
    VerdictEvent,
    VerifierBatch,
    decode,
    encode,
    error_reply,
)
from common.store import CommitStatus, SessionStore, now_ms
from common.subjects import (
    SESSION_CLOSE,
    VERIFIER_HEARTBEAT,
    VERIFIERS_KEY,
    check_token,
    is_publish_subject,
    is_safe_token,
    to_name,
    verifier_batch,
    verifier_done,
)
from common.transport.estimator_store import load_estimator, store_estimator
from common.transport.service import Service, publish_event
from services.gpu_verifier.sessions import ensure_sessions

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
    max_prompt_tokens: int = 0  # 0: half the target's context
    # Latency estimator advertised to the scheduler: "auto" (Redis, then the calibration file
    # in estimator_dir, then a quick profiling run at start), "off", or a calibration file.
    estimator: str = "auto"
    estimator_dir: str = ".wisp/estimator"

    def __post_init__(self) -> None:
        check_token(self.verifier_id, "verifier_id")
        if not 1 <= self.k_max <= MAX_DRAFT_TOKENS:
            raise ValueError(f"k_max must be in [1, {MAX_DRAFT_TOKENS}], got {self.k_max}")
        if self.kv_budget_mb < 1 or self.block_size < 1:
            raise ValueError("kv_budget_mb and block_size must be >= 1")
        if not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_tokens must be >= 0 (0: half the target's context)")


@dataclass(slots=True)
class _Shape:
    """What one batch's forward cost and looked like (estimator features)."""

    batch_ms: float = 0.0  # wall time of the core call
    num_linear: int = 0  # Σ new tokens fed
    num_interactions: int = 0  # Σ new × (cached + new)
    num_cached: int = 0  # Σ cached tokens read

    def add(self, v: Verified) -> None:
        self.num_linear += v.num_fed
        self.num_interactions += v.num_fed * (v.num_cached + v.num_fed)
        self.num_cached += v.num_cached


class VerifierService(Service):
    name = "gpu-verifier"

    def __init__(self, config: VerifierConfig, model: LoadedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.vid = config.verifier_id
        self.model = model  # injected (tests) or loaded in start()
        self.core: VerifierCore | None = None
        self.limits: ModelLimits | None = None
        self.store: SessionStore | None = None
        self.counters: Counter[str] = Counter()  # batches, bad_batches, error:<code>, ...
        self._queue: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()
        # The core is driven by one forward, session load or forget at a time.
        self._core_lock = asyncio.Lock()
        self._answering: set[asyncio.Task] = set()  # commits + replies of finished forwards
        self._batch_sub: Subscription | None = None
        self._close_sub: Subscription | None = None
        self._worker: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self._hardware = "cpu"
        self.estimator: EstimatorCoefficients | None = None
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
        self.core = VerifierCore(runner, self.model.eos_token_id)
        self.limits = ModelLimits(
            vocab=self.model.vocab_info, k_max=cfg.k_max, max_context=runner.max_positions,
            max_prompt_tokens=cfg.max_prompt_tokens or runner.max_positions // 2)
        self._hardware = hardware_name(self.model.device)
        self.store = SessionStore(self.redis)
        self.estimator = await self._load_estimator()
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
        """Stop taking batches, finish the queued ones and their answers, leave the registry."""
        self._ready = False
        try:
            if self._batch_sub is not None:
                with contextlib.suppress(Exception):
                    await self._batch_sub.drain()  # batches already delivered still get queued
            if self._worker is not None:
                self._queue.put_nowait(None)
                await self._worker
            if self._answering:
                await asyncio.gather(*self._answering, return_exceptions=True)
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
        shape, lengths = _Shape(), []
        answers: tuple[list[BatchEntry], list[Verified | WispError]] | None = None
        try:
            valid = []
            for entry in entries:  # the boundary: this model's vocabulary and k_max
                try:
                    check_draft(entry.request, self.limits.k_max, self.limits.vocab.size)
                    valid.append(entry)
                except WispError as err:
                    rejected.append((entry.reply_to, err))
            entries = valid
            for reply_to, err in rejected:
                await self._reply_error(reply_to, err, None)
            if entries:
                outcomes, shape = await self._verify(entries)
                lengths = self._lengths(entries)
                answers = entries, outcomes
        finally:
            # BatchDone goes out first (its write is queued before the answers start), then
            # the commits and replies; the batch's event waits until they are out, so that
            # none of its subscribers compete for the CPU with a forward's commits.
            ev = None
            if batch_id is not None:  # the scheduler's verifier is free again, whatever happened
                ev = await self._publish_done(batch_id, size, shape, lengths)
            if answers is not None:
                task = asyncio.create_task(self._answer_all(*answers, queue_ms, shape.batch_ms,
                                                            size, ev))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            elif ev is not None:
                await publish_event(self.nc, ev)

    def _decode_batch(self, data: bytes) -> tuple[str | None, list[BatchEntry],
                                                  list[tuple[str, WispError]], int]:
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
            raw = msgspec.msgpack.decode(data)
        except Exception:  # noqa: BLE001 - not msgpack at all: nothing to salvage
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
                entries.append(msgspec.convert(item, BatchEntry))
            except msgspec.ValidationError as exc:
                reply_to = item.get("reply_to") if isinstance(item, dict) else None
                if is_publish_subject(reply_to):
                    rejected.append((reply_to, WispError(ErrorCode.BAD_REQUEST,
                                                         f"BatchEntry: {exc}")))
        return batch_id, entries, rejected, len(items)

    async def _verify(self, entries: list[BatchEntry]) -> tuple[list[Verified | WispError],
                                                                  _Shape]:
        """Load what the core lacks, then one core call for the batch."""
        requests = [e.request for e in entries]
        outcomes: list[Verified | WispError | None]
        try:
            outcomes = list(await ensure_sessions(self.core, self.store, self._core_lock,
                                                  requests))
        except Exception:
            log.exception("session_load_failed")
            outcomes = [WispError(ErrorCode.UNAVAILABLE,
                                  "session store unavailable; retry the round")
                        for _ in requests]
        todo = [i for i, o in enumerate(outcomes) if o is None]
        shape = _Shape()
        if todo:
            batch = [requests[i] for i in todo]
            async with self._core_lock:
                started = time.perf_counter()
                try:
                    results = await asyncio.to_thread(self.core.verify_batch, batch)
                except Exception:
                    log.exception("verify_batch_failed", size=len(batch))
                    for r in batch:  # their core state is unknown now: rebuild from Redis
                        self.core.close_session(r.sid)
                    results = [WispError(ErrorCode.UNAVAILABLE,
                                         "verification failed; retry the round")
                               for _ in batch]
                shape.batch_ms = (time.perf_counter() - started) * 1e3
            for i, result in zip(todo, results, strict=True):
                outcomes[i] = result
        for outcome in outcomes:
            if isinstance(outcome, Verified) and not outcome.replayed:
                shape.add(outcome)
        return outcomes, shape  # type: ignore[return-value]

    def _lengths(self, entries: list[BatchEntry]) -> list[SessionLength]:
        """Where each session of the batch stands now (the scheduler's session table)."""
        out = []
        for sid in dict.fromkeys(e.request.sid for e in entries):
            session = self.core.sessions.get(sid)
            if session is not None:
                out.append(SessionLength(sid=sid, committed_len=len(session.committed),
                                         cached_len=self.core.runner.cached_len(sid)))
        return out

    async def _answer_all(self, entries: list[BatchEntry], outcomes: list[Verified | WispError],
                          queue_ms: float, batch_ms: float, size: int,
                          ev: BatchEvent | None = None) -> None:
        try:
            if len(entries) == 1:  # no task per entry (one loop pass less) for a lone one
                await self._answer(entries[0], outcomes[0], queue_ms, batch_ms, size)
                return
            limit = asyncio.Semaphore(_REDIS_CONCURRENCY)

            async def answer(entry: BatchEntry, outcome: Verified | WispError) -> None:
                async with limit:
                    await self._answer(entry, outcome, queue_ms, batch_ms, size)

            await asyncio.gather(*(answer(e, o) for e, o in zip(entries, outcomes, strict=True)))
        finally:
            if ev is not None:
                await publish_event(self.nc, ev)

    async def _answer(self, entry: BatchEntry, outcome: Verified | WispError,
                      queue_ms: float, batch_ms: float, size: int) -> None:
        """Commit (before replying, always), then reply to the entry's inbox."""
        request = entry.request
        with structlog.contextvars.bound_contextvars(sid=request.sid, round=request.round):
            if isinstance(outcome, WispError):
                await self._reply_error(entry.reply_to, outcome, request.sid)
                return
            result = msgspec.structs.replace(outcome.result, queue_ms=queue_ms,
                                             batch_ms=batch_ms, batch_size=size)
            try:
                payload = await self._commit(request, result, encode(result))
            except WispError as err:
                await self._reply_error(entry.reply_to, err, request.sid)
                return
            except Exception:
                log.exception("commit_failed")
                await self._forget(request.sid)  # the core ran ahead of Redis
                await self._reply_error(entry.reply_to, WispError(
                    ErrorCode.UNAVAILABLE, "could not commit the round; retry it"), request.sid)
                return
            try:
                await self.nc.publish(entry.reply_to, payload)
            except Exception:  # committed: a retry of the round gets the stored result
                log.exception("reply_failed")
            if not outcome.replayed:
                await publish_event(self.nc, VerdictEvent(
                    ts_ms=now_ms(), sid=request.sid, round=request.round,
                    device_id=request.device_id, greedy=outcome.greedy,
                    num_drafted=result.num_drafted, num_accepted=result.num_accepted,
                    draft_features=request.draft_features, policy=request.policy,
                    predictor_version=request.predictor_version, censored=request.censored))

    async def _commit(self, request, result, blob: bytes) -> bytes:
        """Commit a verified round to Redis; the payload to reply with (`blob`, or the stored
        result of a replayed round), or raise the error to reply with. Whenever Redis refuses
        the core's view, the core forgets the session so the next batch reloads it."""
        sid = request.sid
        status, committed = await self.store.commit_round(sid, request.round, request.base_len,
                                                          result.new_tokens, blob,
                                                          result.finished)
        self.counters[f"commit:{status.name.lower()}"] += 1
        if status == CommitStatus.APPLIED:
            if result.finished:
                await self._forget(sid)  # free its KV now; a retry of this round reloads it
            return blob
        if status == CommitStatus.REPLAYED:
            record = await self.store.load(sid)
            if record is None or not record.last_result:
                await self._forget(sid)
                raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
            async with self._core_lock:
                session = self.core.sessions.get(sid)
                if session is not None and session.committed != record.tokens:
                    self.core.close_session(sid)  # another verifier committed this round
            return record.last_result
        await self._forget(sid)
        if status == CommitStatus.MISMATCH:
            raise WispError(ErrorCode.BASE_MISMATCH,
                            f"round {request.round} of session {sid} drafts from "
                            f"{request.base_len} committed tokens but the store holds "
                            f"{committed}")
        raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")

    async def _forget(self, sid: str) -> None:
        async with self._core_lock:
            self.core.close_session(sid)

    async def _reply_error(self, reply_to: str, err: WispError, sid: str | None) -> None:
        self.counters[f"error:{err.code}"] += 1
        log.warning("verify_error", code=str(err.code), reason=err.message)
        try:
            await self.nc.publish(reply_to, error_reply(err))
        except Exception:
            log.exception("reply_failed")
        await publish_event(self.nc, ErrorEvent(ts_ms=now_ms(), service=self.name,
                                                code=str(err.code), sid=sid))

    async def _publish_done(self, batch_id: str, size: int, shape: _Shape,
                            lengths: list[SessionLength]) -> BatchEvent:
        """Publish BatchDone; the batch's event, as of now, for the caller to publish once
        the batch's answers are out."""
        done = BatchDone(verifier_id=self.vid, batch_id=batch_id, batch_ms=shape.batch_ms,
                         size=size, num_linear=shape.num_linear,
                         num_interactions=shape.num_interactions, num_cached=shape.num_cached,
                         sessions=lengths)
        try:
            await self.nc.publish(verifier_done(self.vid), encode(done))
        except Exception:
            log.exception("done_publish_failed")
        return BatchEvent(
            ts_ms=now_ms(), verifier_id=self.vid, batch_id=batch_id, size=size,
            batch_ms=shape.batch_ms, num_linear=shape.num_linear,
            num_interactions=shape.num_interactions, num_cached=shape.num_cached,
            queue_depth=self.queue_depth)

    # -- heartbeats -------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        runner = self.core.runner
        blocks = runner.blocks if isinstance(runner, PagedRunner) else None
        return Heartbeat(verifier_id=self.vid, model=to_name(self.model.name),
                         hardware=self._hardware,
                         free_blocks=blocks.num_free_blocks if blocks else 0,
                         total_blocks=blocks.num_blocks if blocks else 0,
                         block_size=blocks.block_size if blocks else 1,
                         num_sessions=len(self.core.sessions), limits=self.limits,
                         ts_ms=now_ms(), estimator=self.estimator)

    async def _load_estimator(self) -> EstimatorCoefficients | None:
        """This verifier's latency estimator (see `VerifierConfig.estimator`), also written to
        Redis when it came from elsewhere. Runs before batches are taken: a profiling run has
        the core to itself. A broken stored one is logged and replaced, never fatal."""
        cfg = self.config
        if cfg.estimator == "off":
            return None
        model, hardware = to_name(Path(self.model.name).name), self._hardware
        est, source, fit = None, "", {}
        if cfg.estimator != "auto":
            est, source = LatencyEstimator.load(cfg.estimator), "file"  # asked for: fatal if bad
        else:
            try:
                est, source = await load_estimator(self.redis, model, hardware), "redis"
            except ValueError as exc:
                log.warning("estimator_unreadable", where="redis", error=str(exc))
            path = Path(cfg.estimator_dir) / f"{model}@{hardware}.json"
            if est is None and path.exists():
                try:
                    est, source = LatencyEstimator.load(path), "file"
                except ValueError as exc:
                    log.warning("estimator_unreadable", where=str(path), error=str(exc))
        if est is None:
            try:
                cal = await asyncio.to_thread(calibrate, self.core, QUICK_GRID, 2,
                                              progress=lambda line: None)
            except ValueError as exc:  # too short a context or too little KV to profile
                log.warning("estimator_unavailable", reason=str(exc))
                return None
            est, source = cal.estimator, "calibrated"
            fit = {"r2": cal.heldout.r2, "mae_ms": cal.heldout.mae_ms}
            log.info("estimator_calibrated", model=model, hardware=hardware,
                     heldout_r2=round(cal.heldout.r2, 4), heldout_mape=round(cal.heldout.mape, 4),
                     shapes=len(cal.samples))
        if source != "redis":
            await store_estimator(self.redis, model, hardware, est, source=source, **fit)
        log.info("estimator_loaded", source=source, model=model, hardware=hardware,
                 **est.as_dict())
        return EstimatorCoefficients(**est.as_dict(), source=source)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                payload = encode(self.heartbeat())
                await self.nc.publish(VERIFIER_HEARTBEAT, payload)
                await self.redis.hset(VERIFIERS_KEY, self.vid, payload)
            except Exception:
                log.warning("heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.config.heartbeat_s)

