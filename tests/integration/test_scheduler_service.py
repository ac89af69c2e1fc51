"""admission-scheduler over real NATS + Redis, with fake verifiers written here.

A fake verifier heart-beats, records the batches it gets, answers each entry's reply inbox
with a `VerifyResult` and then publishes `BatchDone` — at once, or when the test says so
(`hold=True`), which lets a test see what the scheduler sends while a batch is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from common.config import BaseConfig
from common.errors import ErrorCode, WispError
from common.protocol import (
    AdmissionEvent,
    AnyEvent,
    BatchDone,
    ErrorEvent,
    EstimatorCoefficients,
    GenerateDone,
    GenerateRequest,
    Heartbeat,
    ModelLimits,
    SamplingParams,
    SessionClose,
    SessionClosed,
    SessionLength,
    SessionOpen,
    SessionOpened,
    SessionSpec,
    Slo,
    TokenChunk,
    VerifierBatch,
    VerifyRequest,
    VerifyResult,
    VocabInfo,
    decode,
    decode_reply,
    encode,
    new_sid,
)
from common.store import SessionStore, now_ms
from common.subjects import (
    DEADLINES_KEY,
    SERVER_GENERATE,
    SESSION_CLOSE,
    SESSION_OPEN,
    VERIFIER_HEARTBEAT,
    VERIFY_SUBMIT,
    deadline_member,
    event,
    session_key,
    session_tokens_key,
    verifier_batch,
    verifier_done,
)
from common.transport.service import Service, run_service
from services.admission_scheduler.batching import FCFSPolicy, Selection
from services.admission_scheduler.service import SchedulerConfig, SchedulerService

TIMEOUT_S = 5.0
HEARTBEAT_S = 0.1
VOCAB = VocabInfo(size=100, digest="0123456789abcdef")


def limits(k_max: int = 8, max_context: int = 2048, max_prompt_tokens: int = 64,
           vocab: VocabInfo = VOCAB) -> ModelLimits:
    return ModelLimits(vocab=vocab, k_max=k_max, max_context=max_context,
                       max_prompt_tokens=max_prompt_tokens)


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class FakeVerifier:
    def __init__(self, nc: NatsClient, vid: str, free_blocks: int = 100, hold: bool = False,
                 finish_at: int | None = None, model_limits: ModelLimits | None = None,
                 estimator: EstimatorCoefficients | None = None):
        self.nc, self.vid, self.free_blocks, self.hold = nc, vid, free_blocks, hold
        self.estimator = estimator
        self.limits = model_limits or limits()
        self.finish_at = finish_at  # committed length at which a session is finished
        self.batches: list[VerifierBatch] = []
        self.answered: set[str] = set()  # batch ids
        self.beating = True
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(verifier_batch(self.vid), cb=self._on_batch)
        await self._beat()
        self._tasks.append(asyncio.create_task(self._heartbeats()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    def die(self) -> None:
        """Stop heart-beating and answering (batches still arrive and are recorded)."""
        self.beating = False
        self.hold = True

    async def finish(self, batch: VerifierBatch) -> None:
        for entry in batch.items:
            req = entry.request
            new = [*req.draft_ids, 7]
            await self.nc.publish(entry.reply_to, encode(VerifyResult(
                sid=req.sid, round=req.round, num_drafted=len(req.draft_ids),
                num_accepted=len(req.draft_ids), new_tokens=new,
                committed_len=req.base_len + len(new),
                finished=self.finish_at is not None and req.base_len + len(new) >= self.finish_at,
                queue_ms=0.0,
                batch_ms=1.0, batch_size=len(batch.items))))
        n = sum(len(e.request.draft_ids) + 1 for e in batch.items)
        lengths = [SessionLength(sid=e.request.sid, committed_len=e.request.base_len + k,
                                 cached_len=e.request.base_len + k - 1)
                   for e in batch.items for k in [len(e.request.draft_ids) + 1]]
        await self.nc.publish(verifier_done(self.vid), encode(BatchDone(
            verifier_id=self.vid, batch_id=batch.batch_id, batch_ms=1.0,
            size=len(batch.items), num_linear=n, num_interactions=n * 10, num_cached=n * 9,
            sessions=lengths)))
        self.answered.add(batch.batch_id)

    def sids(self, i: int) -> list[str]:
        return [e.request.sid for e in self.batches[i].items]

    async def _on_batch(self, msg: Msg) -> None:
        batch = decode(VerifierBatch, msg.data)
        self.batches.append(batch)
        if not self.hold:
            await self.finish(batch)

    async def _beat(self) -> None:
        await self.nc.publish(VERIFIER_HEARTBEAT, encode(Heartbeat(
            verifier_id=self.vid, model="fake", hardware="cpu", free_blocks=self.free_blocks,
            total_blocks=100, block_size=16, num_sessions=0, limits=self.limits, ts_ms=0.0,
            estimator=self.estimator)))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.beating:
                await self._beat()


@contextlib.asynccontextmanager
async def running(service: Service, config: BaseConfig, *, ready_timeout: float = TIMEOUT_S,
                  stop_timeout: float = 10) -> AsyncIterator[Service]:
    """`service` run as its process would (run_service) until the block ends; a start that
    fails raises here."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(service, config, stop))
    try:
        await until(lambda: service.ready() or task.done(), timeout=ready_timeout)
        if task.done():
            task.result()
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_timeout)


def running_scheduler(nats_url: str, redis_url: str,
                      **overrides) -> contextlib.AbstractAsyncContextManager[SchedulerService]:
    config = SchedulerConfig(nats_url=nats_url, redis_url=redis_url,
                             **{"target_model": "", "drain_timeout_s": 3.0, **overrides})
    return running(SchedulerService(config), config)


@contextlib.asynccontextmanager
async def fake_verifiers(nc: NatsClient, service: SchedulerService,
                         *specs: tuple) -> AsyncIterator[list[FakeVerifier]]:
    """specs: (verifier id, free blocks, hold[, ModelLimits | None[, EstimatorCoefficients]])."""
    fakes = [FakeVerifier(nc, vid, free, hold, model_limits=rest[0] if rest else None,
                          estimator=rest[1] if len(rest) > 1 else None)
             for vid, free, hold, *rest in specs]
    try:
        for fake in fakes:
            await fake.start()
        await until(lambda: set(service.registry.live_ids()) >= {f.vid for f in fakes})
        yield fakes
    finally:
        for fake in fakes:
            await fake.close()


def session_open(sid: str | None = None, n_prompt: int = 5, vocab: VocabInfo = VOCAB,
                 **kw) -> SessionOpen:
    spec = SessionSpec(**{"sid": sid or new_sid(), "mode": "sled", "max_new_tokens": 16,
                          "device_id": "dev-1", "k_max": 4, **kw})
    return SessionOpen(spec=spec, prompt_ids=list(range(1, n_prompt + 1)), vocab=vocab)


async def open_session(nc: NatsClient, **kw) -> SessionOpened:
    reply = await nc.request(SESSION_OPEN, encode(session_open(**kw)), timeout=TIMEOUT_S)
    return decode_reply(SessionOpened, reply.data)


def verify_request(sid: str, round: int = 0, base_len: int = 5) -> VerifyRequest:
    return VerifyRequest(sid=sid, round=round, base_len=base_len, draft_ids=[11, 12, 13],
                         budget_ms=500.0, draft_ms=3.0, device_id="dev-1")


def submit(nc: NatsClient, req: VerifyRequest) -> asyncio.Task:
    async def go() -> VerifyResult:
        reply = await nc.request(VERIFY_SUBMIT, encode(req), timeout=TIMEOUT_S)
        return decode_reply(VerifyResult, reply.data)

    return asyncio.create_task(go())


async def request_error(nc: NatsClient, subject: str, payload: bytes) -> WispError:
    reply = await nc.request(subject, payload, timeout=TIMEOUT_S)
    with pytest.raises(WispError) as info:
        decode_reply(SessionOpened, reply.data)
    return info.value


# -- tests ------------------------------------------------------------------------------------
async def test_open_routes_to_least_loaded_live_verifier_and_writes_redis(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("va", 10, False), ("vb", 50, False))):
        first = await open_session(nc, seed=42, slo=Slo(ttft_ms=300.0, tpot_ms=40.0),
                                   sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20))
        second = await open_session(nc)
        third = await open_session(nc)
        # Ties on session count go to the verifier with more free KV blocks.
        assert [first.verifier_id, second.verifier_id, third.verifier_id] == ["vb", "va", "vb"]
        assert first.committed_len == 5

        raw = await redis_client.hgetall(session_key(first.sid))
        assert set(raw) == {b"spec", b"vocab", b"prompt_len", b"verifier_id", b"committed_len",
                            b"last_round", b"state", b"created_ms", b"last_round_ms",
                            b"last_result"}
        record = await SessionStore(redis_client).load(first.sid)
        assert record.spec == session_open(
            sid=first.sid, seed=42, slo=Slo(ttft_ms=300.0, tpot_ms=40.0),
            sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20)).spec
        assert (record.vocab, record.prompt_len, record.verifier_id, record.committed_len,
                record.last_round, record.state) == (VOCAB, 5, "vb", 5, -1, "active")
        assert await redis_client.lrange(session_tokens_key(first.sid), 0, -1) == \
            [b"1", b"2", b"3", b"4", b"5"]
        second_record = await SessionStore(redis_client).load(second.sid)
        assert (second_record.spec.seed, second_record.spec.slo) == (None, None)
        # The session table holds what a policy needs: SLO, lengths.
        entry = service.registry.sessions.get(first.sid)
        assert (entry.spec.slo.tpot_ms, entry.prompt_len, entry.committed_len,
                entry.cached_len) == (40.0, 5, 5, 0)
        assert service.registry.num_sessions("vb") == 2

        (route,) = service.routes()  # GET /verifiers
        snapshot = json.loads((await route.handler(None)).text)
        assert [(v["id"], v["alive"], v["sessions"], v["free_blocks"], v["queue_depth"],
                 v["in_flight"]) for v in snapshot["verifiers"]] == [
            ("va", True, 1, 10, 0, []), ("vb", True, 2, 50, 0, [])]
        assert snapshot["counters"]["sessions_opened"] == 3


async def test_submits_are_batched_fcfs_with_one_batch_in_flight(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    async with (running_scheduler(nats_url, redis_url, max_batch_size=2) as service,
                fake_verifiers(nc, service, ("v1", 10, True)) as (fake,)):
        sids = [(await open_session(nc)).sid for _ in range(4)]
        first = submit(nc, verify_request(sids[0]))
        await until(lambda: len(fake.batches) == 1)
        assert fake.sids(0) == sids[:1]
        queue = service.registry.verifiers["v1"].queue
        later = []
        for n, sid in enumerate(sids[1:], 1):  # arrive in this order while batch 0 runs
            later.append(submit(nc, verify_request(sid)))
            await until(lambda n=n: len(service.registry.verifiers["v1"].queue) == n)
        assert [e.sid for e in queue] == sids[1:]
        await asyncio.sleep(0.3)
        assert len(fake.batches) == 1  # nothing more until done
        members = {m.decode() for m in await redis_client.zrange(DEADLINES_KEY, 0, -1)}
        assert members == {deadline_member(sid, 0) for sid in sids}

        await fake.finish(fake.batches[0])
        await until(lambda: len(fake.batches) == 2)
        assert fake.sids(1) == sids[1:3]  # FCFS, capped at max_batch_size
        result = await first
        assert (result.sid, result.new_tokens) == (sids[0], [11, 12, 13, 7])
        await asyncio.sleep(0.2)
        assert len(fake.batches) == 2
        await fake.finish(fake.batches[1])
        await until(lambda: len(fake.batches) == 3)
        assert fake.sids(2) == sids[3:]
        await fake.finish(fake.batches[2])
        results = await asyncio.gather(*later)
        assert [r.sid for r in results] == sids[1:]
        await until(lambda: service.counters["batches_done"] == 3)
        assert await redis_client.zcard(DEADLINES_KEY) == 0
        assert service.registry.state("v1").recent_done[-1].batch_id == \
            fake.batches[2].batch_id


async def test_dead_verifier_work_is_resent_to_the_other_one(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    async with (running_scheduler(nats_url, redis_url, heartbeat_timeout_s=0.5) as service,
                fake_verifiers(nc, service, ("va", 90, True), ("vb", 10, False)) as (a, b)):
        s1, s2, s3 = [await open_session(nc) for _ in range(3)]
        assert [s.verifier_id for s in (s1, s2, s3)] == ["va", "vb", "va"]
        in_flight = submit(nc, verify_request(s1.sid))
        await until(lambda: len(a.batches) == 1)
        queued = submit(nc, verify_request(s3.sid))
        await until(lambda: len(service.registry.verifiers["va"].queue) == 1)

        a.die()
        r1, r3 = await asyncio.gather(in_flight, queued)  # answered by vb
        assert (r1.sid, r3.sid) == (s1.sid, s3.sid)
        assert not service.registry.is_alive("va")
        assert sorted(sid for batch in b.batches for sid in
                      (e.request.sid for e in batch.items)) == sorted([s1.sid, s3.sid])
        for sid in (s1.sid, s3.sid):
            assert await redis_client.hget(session_key(sid), "verifier_id") == b"vb"
            assert service.registry.verifier_of(sid) == "vb"
        assert len(a.batches) == 1  # nothing more was sent to the dead one
        assert service.counters["verifiers_dead"] == 1

        # A new session now goes to the only live verifier.
        assert (await open_session(nc)).verifier_id == "vb"


async def test_unknown_session_and_closed_session(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v1", 10, False))):
        with pytest.raises(WispError) as info:
            await submit(nc, verify_request(new_sid()))
        assert info.value.code == ErrorCode.UNKNOWN_SESSION

        opened = await open_session(nc)
        assert (await submit(nc, verify_request(opened.sid))).sid == opened.sid
        reply = await nc.request(SESSION_CLOSE, encode(SessionClose(sid=opened.sid)),
                                 timeout=TIMEOUT_S)
        assert decode_reply(SessionClosed, reply.data).sid == opened.sid
        assert await redis_client.hget(session_key(opened.sid), "state") == b"closed"
        assert service.registry.verifier_of(opened.sid) is None
        with pytest.raises(WispError) as info:
            await submit(nc, verify_request(opened.sid, round=1, base_len=9))
        assert info.value.code == ErrorCode.UNKNOWN_SESSION
        assert "closed" in info.value.message


async def test_bad_input_is_answered_and_others_still_work(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    errors: list[ErrorEvent] = []

    async def on_error(msg: Msg) -> None:
        errors.append(decode(AnyEvent, msg.data))

    await nc.subscribe(event("error"), cb=on_error)
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v1", 10, False, limits(max_prompt_tokens=8)))):
        for subject in (VERIFY_SUBMIT, SESSION_OPEN, SERVER_GENERATE):
            err = await request_error(nc, subject, b"\xc1\x00garbage")
            assert err.code == ErrorCode.BAD_REQUEST, subject
        err = await request_error(nc, VERIFY_SUBMIT, encode(verify_request("s1")) + b"x")
        assert err.code == ErrorCode.BAD_REQUEST and "not valid msgpack" in err.message
        err = await request_error(nc, SESSION_OPEN, encode(session_open(n_prompt=9)))
        assert err.code == ErrorCode.PROMPT_TOO_LONG

        err = await request_error(nc, SERVER_GENERATE, encode(GenerateRequest(
            max_new_tokens=4, mode="sled", prompt_ids=[1, 2])))
        assert err.code == ErrorCode.BAD_REQUEST
        assert "served by the edge-drafter on wisp.edge.generate" in err.message
        err = await request_error(nc, SERVER_GENERATE, encode(GenerateRequest(
            max_new_tokens=4, mode="colocated", prompt_ids=[1, 2])))
        assert err.code == ErrorCode.BAD_REQUEST and "--draft-model" in err.message

        opened = await open_session(nc)
        assert (await submit(nc, verify_request(opened.sid))).round == 0
        assert service.counters["error.bad_request"] == 6
        assert service.counters["error.prompt_too_long"] == 1
        await until(lambda: len(errors) == 7)
        assert {(e.service, e.code) for e in errors} == {
            ("admission-scheduler", "bad_request"), ("admission-scheduler", "prompt_too_long")}


async def test_no_verifier_means_capacity_error_on_open(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with running_scheduler(nats_url, redis_url):
        err = await request_error(nc, SESSION_OPEN, encode(session_open()))
        assert err.code == ErrorCode.CAPACITY
        assert "no verifier is available" in err.message


async def test_queued_round_waits_for_a_verifier_then_expires(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url, heartbeat_timeout_s=0.3,
                                  batch_timeout_s=1.0) as service,
                fake_verifiers(nc, service, ("v1", 10, False)) as (fake,)):
        opened = await open_session(nc)
        fake.die()
        await until(lambda: not service.registry.is_alive("v1"))
        pending = submit(nc, verify_request(opened.sid))
        await until(lambda: len(service.registry.orphans) == 1)
        with pytest.raises(WispError) as info:
            await pending
        assert info.value.code == ErrorCode.CAPACITY
        assert service.registry.orphans == []


async def test_stop_waits_for_the_batch_in_flight(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    config = SchedulerConfig(nats_url=nats_url, redis_url=redis_url, target_model="",
                             drain_timeout_s=5.0)
    service = SchedulerService(config)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(service, config, stop))
    await until(service.ready)
    async with fake_verifiers(nc, service, ("v1", 10, True)) as (fake,):
        opened = await open_session(nc)
        pending = submit(nc, verify_request(opened.sid))
        await until(lambda: len(fake.batches) == 1)
        stop.set()
        await until(lambda: not service.ready())
        await asyncio.sleep(0.3)
        assert not task.done()  # draining: the batch is still running
        await fake.finish(fake.batches[0])
        await asyncio.wait_for(task, TIMEOUT_S)
        assert (await pending).sid == opened.sid


def save_tiny_target(folder: Path) -> VocabInfo:
    """A target folder with only what the scheduler reads: a tokenizer and a config; returns
    its vocabulary as a verifier of that model would advertise it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(20)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0",
                            eos_token="w1").save_pretrained(folder)
    LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, eos_token_id=1).save_pretrained(folder)
    from common.models.vocab import vocab_info

    return vocab_info(20, PreTrainedTokenizerFast.from_pretrained(folder), 1)


async def test_centralized_generation_runs_rounds_through_the_scheduler(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    vocab = save_tiny_target(tmp_path)
    async with (running_scheduler(nats_url, redis_url, target_model=str(tmp_path)) as service,
                fake_verifiers(nc, service, ("v1", 10, False, limits(vocab=vocab))) as (fake,)):
        fake.finish_at = 6  # 3 prompt tokens + max_new_tokens
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(SERVER_GENERATE, encode(GenerateRequest(
            max_new_tokens=3, mode="centralized", prompt="w3 w4 w5")), reply=inbox)
        chunks: list[TokenChunk] = []
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                msg = await sub.next_msg(timeout=TIMEOUT_S)
                reply = decode_reply((TokenChunk, GenerateDone), msg.data)
                if isinstance(reply, GenerateDone):
                    break
                chunks.append(reply)
        assert reply.finish_reason == "length" and reply.num_tokens == 3
        assert [t for c in chunks for t in c.token_ids] == [7, 7, 7]
        assert "".join(c.text for c in chunks).split() == ["w7", "w7", "w7"]
        # Target-only rounds: every request carried an empty draft.
        assert [len(e.request.draft_ids) for b in fake.batches for e in b.items] == [0, 0, 0]
        sid = fake.batches[0].items[0].request.sid
        await until(lambda: service.registry.verifier_of(sid) is None)  # closed at the end
        assert await redis_client.hget(session_key(sid), "state") == b"closed"
        assert (await SessionStore(redis_client).load(sid)).spec.device_id == "server"


async def test_limits_are_agreed_at_open_and_a_mismatch_is_refused_there(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v8", 90, False, limits(k_max=8)),
                               ("v16", 10, False, limits(k_max=16)))):
        # k_max 16 fits only v16 (though v8 has more free blocks): it goes there.
        assert (await open_session(nc, k_max=16)).verifier_id == "v16"
        err = await request_error(nc, SESSION_OPEN, encode(session_open(k_max=32)))
        assert err.code == ErrorCode.DRAFT_TOO_LONG
        assert "k_max 32 exceeds the k_max of verifier v8 (8)" in err.message
        err = await request_error(nc, SESSION_OPEN, encode(session_open(max_new_tokens=2040)))
        assert err.code == ErrorCode.SEQUENCE_TOO_LONG and "context of verifier" in err.message
        other = VocabInfo(size=100, digest="f" * 16)
        err = await request_error(nc, SESSION_OPEN, encode(session_open(vocab=other)))
        assert err.code == ErrorCode.VOCABULARY_MISMATCH and "ffff" in err.message
        err = await request_error(nc, SESSION_OPEN, encode(session_open(n_prompt=100)))
        assert err.code == ErrorCode.OUT_OF_VOCABULARY  # prompt id 100 >= vocabulary of 100
        assert service.counters["sessions_opened"] == 1


async def test_a_draft_over_the_sessions_k_max_is_refused_at_submit(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v1", 10, False)) as (fake,)):
        opened = await open_session(nc, k_max=2)
        with pytest.raises(WispError) as info:
            await submit(nc, verify_request(opened.sid))  # 3 drafted tokens
        assert info.value.code == ErrorCode.DRAFT_TOO_LONG
        assert "the session's k_max is 2" in info.value.message
        assert fake.batches == []


async def test_the_session_table_learns_cached_lengths_and_a_retry_keeps_its_deadline(
        nats_url: str, redis_url: str, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v1", 10, True)) as (fake,)):
        sid = (await open_session(nc)).sid
        first = submit(nc, verify_request(sid))
        await until(lambda: len(fake.batches) == 1 and not service._deadline_writes)
        deadline = await redis_client.zscore(DEADLINES_KEY, deadline_member(sid, 0))
        (pending,) = service.registry.verifiers["v1"].in_flight.values()
        assert (pending.entries[0].num_new, pending.entries[0].num_cached) == (5 + 3, 0)  # cold
        await asyncio.sleep(0.05)
        retry = submit(nc, verify_request(sid))  # the same round again, later
        await until(lambda: len(service.registry.verifiers["v1"].queue) == 1
                    and not service._deadline_writes)
        assert service.registry.verifiers["v1"].queue[0].deadline_ms == deadline
        await fake.finish(fake.batches[0])
        await first
        await until(lambda: len(fake.batches) == 2)
        await fake.finish(fake.batches[1])
        await retry
        # The fake reported 9 committed, 8 cached: the next round is a warm verify.
        entry = service.registry.sessions.get(sid)
        assert (entry.committed_len, entry.cached_len) == (9, 8)
        nxt = submit(nc, verify_request(sid, round=1, base_len=9))
        await until(lambda: len(fake.batches) == 3)
        (pending,) = service.registry.verifiers["v1"].in_flight.values()
        assert (pending.entries[0].num_new, pending.entries[0].num_cached) == (1 + 3, 8)
        await fake.finish(fake.batches[2])
        await nxt


async def test_two_batches_in_flight_when_configured(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url, max_batches_in_flight=2,
                                  max_batch_size=1) as service,
                fake_verifiers(nc, service, ("v1", 10, True)) as (fake,)):
        sids = [(await open_session(nc)).sid for _ in range(3)]
        tasks = [submit(nc, verify_request(sid)) for sid in sids]
        await until(lambda: len(fake.batches) == 2)
        await asyncio.sleep(0.2)
        assert len(fake.batches) == 2  # the third waits for a slot
        await fake.finish(fake.batches[1])  # done out of order frees a slot too
        await until(lambda: len(fake.batches) == 3)
        for batch in (fake.batches[0], fake.batches[2]):
            await fake.finish(batch)
        assert sorted(r.sid for r in await asyncio.gather(*tasks)) == sorted(sids)


class HoldUntil(FCFSPolicy):
    """Holds every batch back until a set time, then FCFS: a stand-in for a deadline-aware
    policy that waits for a latest start time."""

    name = "hold-until"

    def __init__(self, release_ms: float):
        super().__init__()
        self.release_ms = release_ms

    def select(self, queue, now_ms, verifier):
        if now_ms < self.release_ms:
            return Selection([], wake_at_ms=self.release_ms)
        return super().select(queue, now_ms, verifier)


async def test_the_scheduler_wakes_when_its_policy_asks(
        nats_url: str, redis_url: str, nc: NatsClient, monkeypatch) -> None:
    # No periodic check during the test: only the policy's wake-up can dispatch the batch.
    monkeypatch.setattr("services.admission_scheduler.service.CHECK_INTERVAL_S", 60.0)
    async with (running_scheduler(nats_url, redis_url) as service,
                fake_verifiers(nc, service, ("v1", 10, False)) as (fake,)):
        sid = (await open_session(nc)).sid
        service.policies = {"hold": HoldUntil(now_ms() + 150.0)}
        started = asyncio.get_running_loop().time()
        result = await submit(nc, verify_request(sid))
        waited_ms = (asyncio.get_running_loop().time() - started) * 1e3
        assert result.sid == sid and len(fake.batches) == 1
        assert 100.0 <= waited_ms < 2000.0, waited_ms


async def test_a_waiting_round_keeps_the_clients_stream_alive(
        nats_url: str, redis_url: str, nc: NatsClient, tmp_path: Path) -> None:
    """While a round waits (here: a verifier holding its batch), the generation server sends
    empty chunks, so a client's stall timeout fires only for a server that is gone."""
    vocab = save_tiny_target(tmp_path)
    async with (running_scheduler(nats_url, redis_url, target_model=str(tmp_path)) as service,
                fake_verifiers(nc, service, ("v1", 10, True, limits(vocab=vocab))) as (fake,)):
        service._server.keepalive_s = 0.1
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(SERVER_GENERATE, encode(GenerateRequest(
            max_new_tokens=1, mode="centralized", prompt="w3 w4")), reply=inbox)
        first = decode_reply((TokenChunk, GenerateDone), (await sub.next_msg(TIMEOUT_S)).data)
        await until(lambda: len(fake.batches) == 1)
        keepalives = [decode_reply((TokenChunk, GenerateDone),
                                   (await sub.next_msg(TIMEOUT_S)).data) for _ in range(3)]
        assert all(isinstance(k, TokenChunk) and k.token_ids == [] and k.index == 0
                   for k in [first, *keepalives])
        fake.finish_at = 3
        await fake.finish(fake.batches[0])
        async with asyncio.timeout(TIMEOUT_S):
            while not isinstance(reply := decode_reply(
                    (TokenChunk, GenerateDone), (await sub.next_msg(TIMEOUT_S)).data),
                    GenerateDone):
                pass
        assert reply.num_tokens == 1 and reply.finish_reason == "length"


# -- admission control ------------------------------------------------------------------------
# 1 ms per fed token + 5 ms per batch: a round of k = 4 alone takes 10 ms, two together 15 ms.
# With TPOT 10 ms, a round's nominal server share is 0.5 * (4 + 1) * 10 = 25 ms; the predicted
# server time of a round is (1 batch in flight + 1) * T̂(all sessions): 20 ms for one session,
# 30 ms for two — the second does not fit.
SLOW = EstimatorCoefficients(a=1.0, b_compute=0.0, b_read=0.0, c=5.0)
TIGHT = Slo(ttft_ms=1000.0, tpot_ms=10.0)


async def test_admission_refuses_an_open_that_would_break_the_admitted_slos(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    events: list[AdmissionEvent] = []

    async def on_event(msg: Msg) -> None:
        events.append(decode(AdmissionEvent, msg.data))

    sub = await nc.subscribe(event("admission"), cb=on_event)
    async with (running_scheduler(nats_url, redis_url, admission="reject") as service,
                fake_verifiers(nc, service, ("va", 100, False, None, SLOW))):
        first = await open_session(nc, slo=TIGHT)
        err = await request_error(nc, SESSION_OPEN, encode(session_open(slo=TIGHT)))
        assert err.code == ErrorCode.OVERLOADED and err.retry_after_ms >= 100
        assert "predicted" in err.message, err.message
        # A session without an SLO adds load too: it would push the first one past its SLO.
        err = await request_error(nc, SESSION_OPEN, encode(session_open()))
        assert err.code == ErrorCode.OVERLOADED
        assert service.registry.num_sessions("va") == 1  # nothing of the refused ones stays
        await nc.request(SESSION_CLOSE, encode(SessionClose(sid=first.sid)), timeout=TIMEOUT_S)
        await open_session(nc, slo=TIGHT)  # room again
        await until(lambda: len(events) >= 4)
        assert [e.outcome for e in events] == ["admitted", "refused", "refused", "admitted"]
        refused = events[1]
        assert refused.verifier_id == "va" and refused.predicted_round_ms == 30.0
        assert refused.budget_ms == 25.0 and refused.retry_after_ms == err.retry_after_ms
        assert service.counters["admission_refused"] == 2
    await sub.unsubscribe()


async def test_admission_queue_admits_a_waiting_open_when_room_frees(
        nats_url: str, redis_url: str, nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url, admission="queue", admission_queue=1,
                                  admission_wait_s=5.0) as service,
                fake_verifiers(nc, service, ("va", 100, False, None, SLOW))):
        first = await open_session(nc, slo=TIGHT)
        waiting = asyncio.create_task(open_session(nc, slo=TIGHT))
        await until(lambda: service.counters["admission_queued"] == 1)
        # The queue holds one: the next is refused at once.
        err = await request_error(nc, SESSION_OPEN, encode(session_open(slo=TIGHT)))
        assert err.code == ErrorCode.OVERLOADED
        assert not waiting.done()
        await nc.request(SESSION_CLOSE, encode(SessionClose(sid=first.sid)), timeout=TIMEOUT_S)
        opened = await asyncio.wait_for(waiting, TIMEOUT_S)
        assert opened.verifier_id == "va" and service.registry.num_sessions("va") == 1
    async with (running_scheduler(nats_url, redis_url, admission="queue",
                                  admission_wait_s=0.3) as service,
                fake_verifiers(nc, service, ("va", 100, False, None, SLOW))):
        await open_session(nc, slo=TIGHT)
        err = await request_error(nc, SESSION_OPEN, encode(session_open(slo=TIGHT)))
        assert err.code == ErrorCode.OVERLOADED  # waited its 0.3 s, then refused


async def test_admission_hard_cap_and_off(nats_url: str, redis_url: str,
                                          nc: NatsClient) -> None:
    async with (running_scheduler(nats_url, redis_url, max_sessions_per_verifier=2) as service,
                fake_verifiers(nc, service, ("va", 100, False))):  # no estimator: the cap alone
        await open_session(nc)
        await open_session(nc)
        err = await request_error(nc, SESSION_OPEN, encode(session_open()))
        assert err.code == ErrorCode.OVERLOADED
    async with (running_scheduler(nats_url, redis_url, admission="off") as service,
                fake_verifiers(nc, service, ("va", 100, False, None, SLOW))):
        for _ in range(3):
            await open_session(nc, slo=TIGHT)
        assert service.registry.num_sessions("va") == 3
