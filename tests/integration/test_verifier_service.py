"""gpu-verifier service over real NATS + Redis, with a tiny random Llama on CPU (fp32)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import torch
from nats.aio.client import Client as NatsClient

from common.engine.calibrate import hardware_name
from common.errors import ErrorCode, WispError
from common.models.loading import LoadedModel
from common.protocol import (
    AnyEvent,
    BatchDone,
    BatchEntry,
    BatchEvent,
    Heartbeat,
    SamplingParams,
    SessionClose,
    SessionSpec,
    VerifierBatch,
    VerifyRequest,
    VerifyResult,
    decode,
    decode_reply,
    encode,
    new_sid,
)
from common.store import SessionRecord, SessionStore
from common.subjects import (
    SESSION_CLOSE,
    VERIFIER_HEARTBEAT,
    VERIFIERS_KEY,
    estimator_key,
    event,
    session_key,
    session_tokens_key,
    verifier_batch,
    verifier_done,
)
from common.transport.estimator_store import load_estimator
from common.transport.service import run_service
from services.gpu_verifier.service import VerifierConfig, VerifierService
from tests.unit.tiny_random_models import VOCAB, random_tokens, reference_logits, tiny_llama

K_MAX = 4
TIMEOUT_S = 5.0


@functools.cache
def target() -> LoadedModel:
    # No EOS: sessions end at max_new_tokens, whatever the random weights emit.
    model = tiny_llama(seed=3, eos_token_id=None)
    return LoadedModel("tiny-llama", model, None, torch.device("cpu"), torch.float32)


@functools.cache
def greedy(prompt: tuple[int, ...], n: int) -> list[int]:
    """The target's own greedy continuation (plain transformers forward, no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logits(target().model, ids)[-1].argmax()))
    return ids[len(prompt):]


@dataclass
class Running:
    service: VerifierService
    stop: asyncio.Event
    task: asyncio.Task

    @property
    def vid(self) -> str:
        return self.service.vid

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


@pytest_asyncio.fixture
async def start_verifier(nats_url: str, redis_url: str, redis_client: aioredis.Redis,
                         tmp_path) -> AsyncIterator[Callable]:
    running: list[Running] = []

    async def start() -> Running:
        config = VerifierConfig(nats_url=nats_url, redis_url=redis_url, http_port=0,
                                k_max=K_MAX, kv_budget_mb=1, heartbeat_s=0.1,
                                drain_timeout_s=5.0, estimator_dir=str(tmp_path))
        service = VerifierService(config, model=target())
        stop = asyncio.Event()
        task = asyncio.create_task(run_service(service, config, stop))
        run = Running(service, stop, task)
        running.append(run)
        await until(lambda: service.ready() or task.done())
        if task.done():
            task.result()
        return run

    yield start
    for run in running:
        if not run.task.done():
            await run.shutdown()


@pytest_asyncio.fixture
async def subscribe(nc: NatsClient) -> AsyncIterator[Callable]:
    """nc.subscribe for subjects a test may not read to the end: unsubscribed at teardown, so
    the nc fixture's drain does not wait on their unread messages."""
    subs = []

    async def sub(subject: str):
        subs.append(await nc.subscribe(subject))
        return subs[-1]

    yield sub
    for s in subs:
        await s.unsubscribe()


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def open_session(redis_client: aioredis.Redis, prompt: list[int],
                       max_new_tokens: int = 16) -> str:
    sid = new_sid()
    spec = SessionSpec(sid=sid, mode="sled", max_new_tokens=max_new_tokens, k_max=K_MAX)
    await SessionStore(redis_client).create(SessionRecord(
        spec=spec, prompt_len=len(prompt), verifier_id="v-test", tokens=list(prompt)))
    return sid


def request(sid: str, round: int, base_len: int, draft: list[int]) -> VerifyRequest:
    return VerifyRequest(sid=sid, round=round, base_len=base_len, draft_ids=draft,
                         budget_ms=500.0, draft_ms=1.0, device_id="dev-0")


async def send_batch(nc: NatsClient, vid: str, requests: list[VerifyRequest],
                     batch_id: str | None = None, wait: bool = True) -> list:
    """Publish one batch; return each entry's reply subscription (or, with wait, its bytes)."""
    subs, entries = [], []
    for req in requests:
        inbox = nc.new_inbox()
        subs.append(await nc.subscribe(inbox))
        entries.append(BatchEntry(request=req, reply_to=inbox))
    batch = VerifierBatch(batch_id=batch_id or new_sid()[:12], items=entries)
    await nc.publish(verifier_batch(vid), encode(batch))
    if not wait:
        return subs
    return [(await sub.next_msg(timeout=TIMEOUT_S)).data for sub in subs]


def error_code(payload: bytes) -> ErrorCode:
    with pytest.raises(WispError) as info:
        decode_reply(VerifyResult, payload)
    return info.value.code


async def committed_tokens(redis_client: aioredis.Redis, sid: str) -> list[int]:
    return [int(t) for t in await redis_client.lrange(session_tokens_key(sid), 0, -1)]


async def test_rounds_match_target_greedy_and_are_committed(
        start_verifier, subscribe, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(8, seed=1)
    ref = greedy(tuple(prompt), 7)
    sid = await open_session(redis_client, prompt)
    done_sub = await subscribe(verifier_done(v.vid))
    event_sub = await subscribe(event("batch"))

    # Round 0: a cold prefill of the prompt with a fully correct draft.
    [reply] = await send_batch(nc, v.vid, [request(sid, 0, 8, ref[:3])], batch_id="b0")
    result = decode_reply(VerifyResult, reply)
    assert (result.new_tokens, result.num_accepted, result.committed_len) == (ref[:4], 3, 12)
    assert result.batch_size == 1 and result.batch_ms > 0 and result.queue_ms >= 0
    done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    assert (done.verifier_id, done.batch_id, done.size) == (v.vid, "b0", 1)
    assert (done.num_linear, done.num_cached, done.num_interactions) == (11, 0, 11 * 11)
    assert done.batch_ms == pytest.approx(result.batch_ms)
    ev = decode(AnyEvent, (await event_sub.next_msg(TIMEOUT_S)).data)
    assert isinstance(ev, BatchEvent) and ev.batch_id == "b0"
    assert (ev.verifier_id, ev.size, ev.num_linear, ev.num_cached, ev.num_interactions) == \
        (v.vid, 1, 11, 0, 11 * 11)

    # Round 1: the second drafted token is wrong; warm KV holds the 11 fed tokens.
    wrong = (ref[5] + 1) % VOCAB
    [reply] = await send_batch(nc, v.vid, [request(sid, 1, 12, [ref[4], wrong, ref[6]])])
    result = decode_reply(VerifyResult, reply)
    assert (result.new_tokens, result.num_accepted, result.committed_len) == (ref[4:6], 1, 14)
    done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    assert (done.num_linear, done.num_cached, done.num_interactions) == (4, 11, 4 * 15)

    # Round 2: no draft at all (plain decode step).
    [reply] = await send_batch(nc, v.vid, [request(sid, 2, 14, [])])
    assert decode_reply(VerifyResult, reply).new_tokens == ref[6:7]

    assert await committed_tokens(redis_client, sid) == prompt + ref
    record = await SessionStore(redis_client).load(sid)
    assert (record.committed_len, record.last_round, record.state) == (15, 2, "active")


async def test_retry_of_a_round_is_answered_identically_and_not_reapplied(
        start_verifier, subscribe, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(6, seed=2)
    ref = greedy(tuple(prompt), 4)
    sid = await open_session(redis_client, prompt)
    done_sub = await subscribe(verifier_done(v.vid))

    [first] = await send_batch(nc, v.vid, [request(sid, 0, 6, ref[:2])])
    await done_sub.next_msg(TIMEOUT_S)
    [again] = await send_batch(nc, v.vid, [request(sid, 0, 6, ref[:2])])
    assert again == first
    assert decode_reply(VerifyResult, first).new_tokens == ref[:3]
    assert await committed_tokens(redis_client, sid) == prompt + ref[:3]
    replay_done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    assert replay_done.num_linear == 0  # answered from memory, no forward work
    assert v.service.counters["commit:replayed"] == 1


async def test_failover_rebuilds_the_session_from_redis(
        start_verifier, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    first, second = await start_verifier(), await start_verifier()
    prompt = random_tokens(7, seed=3)
    ref = greedy(tuple(prompt), 8)
    sid = await open_session(redis_client, prompt, max_new_tokens=8)

    [reply0] = await send_batch(nc, first.vid, [request(sid, 0, 7, ref[:3])])
    assert decode_reply(VerifyResult, reply0).new_tokens == ref[:4]
    await first.shutdown()  # the first verifier dies; the scheduler re-queues on the second

    # A retry of the committed round gets the stored answer from a verifier that never saw it.
    [retry] = await send_batch(nc, second.vid, [request(sid, 0, 7, ref[:3])])
    assert retry == reply0
    assert sid in second.service.core.sessions
    [reply1] = await send_batch(nc, second.vid, [request(sid, 1, 11, ref[4:7])])
    result = decode_reply(VerifyResult, reply1)
    assert (result.new_tokens, result.committed_len, result.finished) == (ref[4:8], 15, True)
    assert await committed_tokens(redis_client, sid) == prompt + ref
    assert (await redis_client.hget(session_key(sid), "state")) == b"finished"
    assert sid not in second.service.core.sessions  # KV freed once finished
    # A retry of the last round still gets its answer; a new round is refused.
    [retry1] = await send_batch(nc, second.vid, [request(sid, 1, 11, ref[4:7])])
    assert retry1 == reply1
    [late] = await send_batch(nc, second.vid, [request(sid, 2, 15, [])])
    assert error_code(late) == ErrorCode.SESSION_FINISHED


async def test_bad_entries_get_errors_while_a_good_entry_succeeds(
        start_verifier, subscribe, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(5, seed=4)
    ref = greedy(tuple(prompt), 3)
    good, stale, oov, long = [await open_session(redis_client, prompt) for _ in range(4)]
    done_sub = await subscribe(verifier_done(v.vid))

    replies = await send_batch(nc, v.vid, [
        request(good, 0, 5, ref[:2]),
        request(stale, 0, 9, ref[:2]),
        request(new_sid(), 0, 5, ref[:2]),
        request(oov, 0, 5, [ref[0], VOCAB + 3]),
        request(long, 0, 5, ref[:1] * (K_MAX + 1)),
    ])
    assert decode_reply(VerifyResult, replies[0]).new_tokens == ref[:3]
    assert [error_code(r) for r in replies[1:]] == [
        ErrorCode.BASE_MISMATCH, ErrorCode.UNKNOWN_SESSION, ErrorCode.OUT_OF_VOCABULARY,
        ErrorCode.DRAFT_TOO_LONG]
    done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    assert (done.size, done.num_linear) == (5, 5 + 2)
    assert await committed_tokens(redis_client, good) == prompt + ref[:3]
    for sid in (stale, oov, long):
        assert await committed_tokens(redis_client, sid) == prompt
    assert v.service.counters["error:base_mismatch"] == 1


async def test_redis_disagreeing_with_the_core_is_refused_then_reloaded(
        start_verifier, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(6, seed=5)
    ref = greedy(tuple(prompt), 4)
    sid = await open_session(redis_client, prompt)
    [reply] = await send_batch(nc, v.vid, [request(sid, 0, 6, ref[:3])])
    assert decode_reply(VerifyResult, reply).committed_len == 10

    # Someone else committed a round behind this verifier's back.
    extra = (ref[3] + 7) % VOCAB
    await redis_client.rpush(session_tokens_key(sid), extra)
    await redis_client.hset(session_key(sid), mapping={"committed_len": 11, "last_round": 1})
    [reply] = await send_batch(nc, v.vid, [request(sid, 2, 10, [])])
    assert error_code(reply) == ErrorCode.BASE_MISMATCH
    assert sid not in v.service.core.sessions
    assert await committed_tokens(redis_client, sid) == prompt + ref[:4] + [extra]

    # The next round drafts from Redis's view and is served from a rebuilt session.
    history = prompt + ref[:4] + [extra]
    [reply] = await send_batch(nc, v.vid, [request(sid, 2, 11, [])])
    assert decode_reply(VerifyResult, reply).new_tokens == greedy(tuple(history), 1)


async def test_garbage_on_the_batch_subject_does_not_kill_the_service(
        start_verifier, subscribe, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    done_sub = await subscribe(verifier_done(v.vid))
    inbox = nc.new_inbox()
    bad_entry_sub = await nc.subscribe(inbox)
    await nc.publish(verifier_batch(v.vid), b"\xc1 not msgpack")
    await nc.publish(verifier_batch(v.vid), msgspec.msgpack.encode([1, 2, 3]))
    # A readable batch id with a malformed entry: the entry is refused, the batch is "done".
    await nc.publish(verifier_batch(v.vid), msgspec.msgpack.encode({
        "type": "VerifierBatch", "v": 1, "batch_id": "bad-1",
        "items": [{"request": {"sid": "x"}, "reply_to": inbox}]}))
    assert error_code((await bad_entry_sub.next_msg(TIMEOUT_S)).data) == ErrorCode.BAD_REQUEST
    done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    assert (done.batch_id, done.size, done.num_linear) == ("bad-1", 1, 0)

    prompt = random_tokens(5, seed=6)
    sid = await open_session(redis_client, prompt)
    [reply] = await send_batch(nc, v.vid, [request(sid, 0, 5, [])])
    assert decode_reply(VerifyResult, reply).new_tokens == greedy(tuple(prompt), 1)
    assert v.service.counters["bad_batches"] == 3
    assert not v.task.done()


async def test_heartbeats_and_registry(start_verifier, subscribe, nc: NatsClient,
                                       redis_client: aioredis.Redis) -> None:
    hb_sub = await subscribe(VERIFIER_HEARTBEAT)
    v = await start_verifier()
    async with asyncio.timeout(TIMEOUT_S):
        while (hb := decode(Heartbeat, (await hb_sub.next_msg(TIMEOUT_S)).data)).verifier_id \
                != v.vid:
            pass
    assert (hb.model, hb.hardware, hb.num_sessions) == ("tiny-llama", hardware_name("cpu"), 0)
    assert 0 < hb.free_blocks == hb.total_blocks
    # It advertises what it can take: sessions are agreed against this at open.
    assert (hb.limits.k_max, hb.limits.vocab.size) == (K_MAX, VOCAB)
    assert hb.limits.max_context == target().max_positions
    stored = decode(Heartbeat, await redis_client.hget(VERIFIERS_KEY, v.vid))
    assert stored.verifier_id == v.vid and stored.total_blocks == hb.total_blocks
    await v.shutdown()
    assert not await redis_client.hexists(VERIFIERS_KEY, v.vid)


async def test_estimator_is_calibrated_once_then_loaded_from_redis(
        start_verifier, redis_client: aioredis.Redis) -> None:
    """No coefficients in Redis (nor a file): the verifier profiles its own core at start,
    stores them per (model, hardware) and advertises them; the next one loads them. Broken
    stored coefficients are replaced, not fatal."""
    key = estimator_key("tiny-llama", hardware_name("cpu"))
    await redis_client.delete(key)
    first = await start_verifier()
    advertised = first.service.heartbeat().estimator
    assert advertised is not None and advertised.source == "calibrated"
    stored = await load_estimator(redis_client, "tiny-llama", hardware_name("cpu"))
    assert stored is not None and stored.as_dict() == {
        k: getattr(advertised, k) for k in ("a", "b_compute", "b_read", "c")}
    second = await start_verifier()
    again = second.service.heartbeat().estimator
    assert again is not None and again.source == "redis" and again.a == advertised.a
    await redis_client.hset(key, "a", "not a number")
    third = await start_verifier()
    assert third.service.heartbeat().estimator.source == "calibrated"
    assert (await load_estimator(redis_client, "tiny-llama", hardware_name("cpu"))) is not None


async def test_session_close_frees_the_core_session(
        start_verifier, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(6, seed=7)
    sid = await open_session(redis_client, prompt)
    await send_batch(nc, v.vid, [request(sid, 0, 6, [])])
    runner = v.service.core.runner
    assert sid in v.service.core.sessions and runner.cached_len(sid) > 0

    await SessionStore(redis_client).close(sid)
    await nc.publish(SESSION_CLOSE, encode(SessionClose(sid=sid)))
    await until(lambda: sid not in v.service.core.sessions)
    assert runner.cached_len(sid) == 0
    [reply] = await send_batch(nc, v.vid, [request(sid, 1, 7, [])])
    assert error_code(reply) == ErrorCode.UNKNOWN_SESSION


async def test_stop_finishes_queued_batches(start_verifier, nc: NatsClient,
                                            redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompts = [random_tokens(6, seed=8), random_tokens(9, seed=9)]
    sids = [await open_session(redis_client, p) for p in prompts]
    subs = []
    for sid, prompt in zip(sids, prompts, strict=True):
        subs += await send_batch(nc, v.vid, [request(sid, 0, len(prompt), [])], wait=False)
    await nc.flush()  # both batches reached the server before the verifier is told to stop
    await v.shutdown()
    for sub, prompt in zip(subs, prompts, strict=True):
        result = decode_reply(VerifyResult, (await sub.next_msg(TIMEOUT_S)).data)
        assert result.new_tokens == greedy(tuple(prompt), 1)
    assert not await redis_client.hexists(VERIFIERS_KEY, v.vid)


async def test_a_failing_core_call_is_answered_and_the_worker_survives(
        start_verifier, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(6, seed=10)
    sid = await open_session(redis_client, prompt)
    core = v.service.core

    def boom(items):
        del core.verify_batch  # fail once, then the real method again
        raise RuntimeError("device lost")

    core.verify_batch = boom
    [reply] = await send_batch(nc, v.vid, [request(sid, 0, 6, [])])
    assert error_code(reply) == ErrorCode.UNAVAILABLE  # transient: the edge retries the round
    assert await committed_tokens(redis_client, sid) == prompt
    [reply] = await send_batch(nc, v.vid, [request(sid, 0, 6, [])])
    assert decode_reply(VerifyResult, reply).new_tokens == greedy(tuple(prompt), 1)


async def test_done_reports_where_sessions_stand_and_verdicts_carry_features(
        start_verifier, subscribe, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    v = await start_verifier()
    prompt = random_tokens(6, seed=11)
    ref = greedy(tuple(prompt), 3)
    sid = await open_session(redis_client, prompt)
    done_sub = await subscribe(verifier_done(v.vid))
    verdict_sub = await subscribe(event("verdict"))
    wrong = (ref[1] + 1) % VOCAB
    features = [[0.9, 0.1, 0.5, 0.0, 0.0, 0.9, 1.0], [0.2, 2.0, 0.1, 0.0, 1.0, 0.18, 1.0]]
    req = msgspec.structs.replace(request(sid, 0, 6, [ref[0], wrong]), draft_features=features,
                                  policy="predictor", predictor_version="mlp-1", censored=True)
    [reply] = await send_batch(nc, v.vid, [req])
    assert decode_reply(VerifyResult, reply).new_tokens == ref[:2]
    done = decode(BatchDone, (await done_sub.next_msg(TIMEOUT_S)).data)
    # 8 committed; the KV holds all but the last (the scheduler's session table reads this).
    assert [(s.sid, s.committed_len, s.cached_len) for s in done.sessions] == [(sid, 8, 7)]
    verdict = decode(AnyEvent, (await verdict_sub.next_msg(TIMEOUT_S)).data)
    assert (verdict.sid, verdict.num_drafted, verdict.num_accepted, verdict.greedy) == \
        (sid, 2, 1, True)
    assert verdict.draft_features == features
    # Which policy and model drafted the round, and whether it was cut, pass through.
    assert (verdict.policy, verdict.predictor_version, verdict.censored) == \
        ("predictor", "mlp-1", True)


async def test_degenerate_sampling_values_in_a_batch_leave_the_others_exact(
        start_verifier, nc: NatsClient, redis_client: aioredis.Redis) -> None:
    """temperature and top_p at the edge of their ranges work (here: reduce to the argmax)
    and fail nobody else in their batch."""
    v = await start_verifier()
    prompt = random_tokens(7, seed=12)
    ref = greedy(tuple(prompt), 1)
    store = SessionStore(redis_client)
    sids = []
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_p=1e-300),
                     SamplingParams(temperature=1e-300), SamplingParams(temperature=5e-324),
                     SamplingParams(temperature=1e300, top_k=1)):
        sid = new_sid()
        await store.create(SessionRecord(
            spec=SessionSpec(sid=sid, mode="sled", max_new_tokens=4, k_max=K_MAX,
                             sampling=sampling, seed=1),
            prompt_len=len(prompt), tokens=list(prompt)))
        sids.append(sid)
    replies = await send_batch(nc, v.vid, [request(sid, 0, 7, []) for sid in sids])
    assert [decode_reply(VerifyResult, r).new_tokens for r in replies] == [ref] * len(sids)
