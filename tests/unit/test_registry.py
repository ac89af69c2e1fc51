"""Verifier registry: routing, liveness, reassignment of sessions and work, orphans."""

from __future__ import annotations

import pytest

from common.engine.estimator import BatchShape
from common.protocol import (
    BatchDone,
    EstimatorCoefficients,
    Heartbeat,
    ModelLimits,
    SessionLength,
    SessionSpec,
    VerifyRequest,
    VocabInfo,
)
from services.admission_scheduler.batching import PendingVerify, kv_claim
from services.admission_scheduler.registry import VerifierRegistry

T0 = 1_000_000.0  # ms
VOCAB = VocabInfo(size=100, digest="0123456789abcdef")


def limits(k_max: int = 8, context: int = 2048, vocab: VocabInfo = VOCAB) -> ModelLimits:
    return ModelLimits(vocab=vocab, k_max=k_max, max_context=context, max_prompt_tokens=1024)


def hb(vid: str, free: int = 100, total: int = 100,
       estimator: EstimatorCoefficients | None = None, **kw) -> Heartbeat:
    return Heartbeat(verifier_id=vid, model="m", hardware="cpu", free_blocks=free,
                     total_blocks=total, block_size=16, num_sessions=0,
                     limits=limits(**kw), ts_ms=0.0, estimator=estimator)


def pending(sid: str, round: int = 0, arrival_ms: float = T0,
            reply_to: str | None = None) -> PendingVerify:
    request = VerifyRequest(sid=sid, round=round, base_len=5, draft_ids=[1, 2],
                            budget_ms=50.0, draft_ms=1.0, device_id="dev")
    return PendingVerify(request=request, reply_to=reply_to or f"_INBOX.{sid}.{round}",
                         arrival_ms=arrival_ms, deadline_ms=arrival_ms + 50.0)


def registry(*verifiers: tuple[str, int], now: float = T0) -> VerifierRegistry:
    reg = VerifierRegistry(heartbeat_timeout_s=3.0, batch_timeout_s=30.0, now_ms=now)
    for vid, free in verifiers:
        assert reg.heartbeat(hb(vid, free), now)
    return reg


def open_session(reg: VerifierRegistry, sid: str, now: float = T0) -> str:
    vid = reg.pick()
    assert vid is not None
    reg.assign(sid, vid, now)
    return vid


# -- routing ----------------------------------------------------------------------------------
def test_pick_fewest_sessions_then_most_free_blocks() -> None:
    reg = registry(("a", 10), ("b", 50), ("c", 30))
    assert [open_session(reg, f"s{i}") for i in range(4)] == ["b", "c", "a", "b"]
    assert [reg.num_sessions(v) for v in "abc"] == [1, 2, 1]


def test_pick_skips_dead_verifiers_and_none_when_all_dead() -> None:
    reg = registry(("a", 10), ("b", 50))
    reg.declare_dead("b", "heartbeat", T0)
    assert reg.pick() == "a"
    reg.declare_dead("a", "heartbeat", T0)
    assert reg.pick() is None
    assert reg.live_ids() == []


def test_enqueue_goes_to_the_session_verifier() -> None:
    reg = registry(("a", 10), ("b", 50))
    reg.assign("s", "a", T0)
    vid, moved = reg.enqueue(pending("s"), T0)
    assert (vid, moved) == ("a", {})
    assert [e.sid for e in reg.verifiers["a"].queue] == ["s"]
    assert reg.dispatchable() == ["a"]


def test_retry_of_a_queued_round_replaces_it_in_place() -> None:
    reg = registry(("a", 10))
    for sid in ("s", "t"):
        reg.assign(sid, "a", T0)
    reg.enqueue(pending("s", arrival_ms=T0), T0)
    reg.enqueue(pending("t", arrival_ms=T0 + 1), T0 + 1)
    reg.enqueue(pending("s", arrival_ms=T0 + 5, reply_to="_INBOX.retry"), T0 + 5)
    queue = reg.verifiers["a"].queue
    assert [(e.sid, e.reply_to, e.arrival_ms) for e in queue] == [
        ("s", "_INBOX.retry", T0), ("t", "_INBOX.t.0", T0 + 1)]


# -- liveness ---------------------------------------------------------------------------------
def test_heartbeat_timeout() -> None:
    reg = registry(("a", 10), ("b", 10))
    reg.heartbeat(hb("b"), T0 + 2_500)
    assert reg.timed_out(T0 + 3_000) == []
    assert reg.timed_out(T0 + 3_001) == [("a", "heartbeat")]
    reg.declare_dead("a", "heartbeat", T0 + 3_001)
    assert reg.timed_out(T0 + 3_002) == []  # already dead
    assert reg.heartbeat(hb("a"), T0 + 4_000)  # a restarted verifier with the same id
    assert reg.is_alive("a")


def test_batch_timeout_and_stuck_verifier_not_revived_by_heartbeats() -> None:
    reg = registry(("a", 10), ("b", 10))
    reg.assign("s", "a", T0)
    reg.enqueue(pending("s"), T0)
    reg.start_batch("a", "b1", list(reg.verifiers["a"].queue), T0)
    now = T0 + 30_001
    for vid in "ab":
        reg.heartbeat(hb(vid), now)
    assert reg.timed_out(now) == [("a", "batch_timeout")]
    reg.declare_dead("a", "batch_timeout", now)
    assert not reg.heartbeat(hb("a"), now + 1_000)  # event loop alive, worker stuck
    assert not reg.is_alive("a")
    assert reg.finish_batch("a", "b1") is None  # late done: not in flight any more...
    assert reg.heartbeat(hb("a"), now + 2_000)  # ...but it came unstuck
    assert reg.is_alive("a")


def test_done_finishes_only_the_batch_in_flight_and_keeps_feedback() -> None:
    reg = registry(("a", 10))
    reg.assign("s", "a", T0)
    reg.enqueue(pending("s"), T0)
    reg.start_batch("a", "b1", list(reg.verifiers["a"].queue), T0)
    assert reg.verifiers["a"].queue == []
    assert reg.dispatchable() == []  # one batch in flight at most (by default)
    done = BatchDone(verifier_id="a", batch_id="b1", batch_ms=5.0, size=1, num_linear=3,
                     num_interactions=9, num_cached=5,
                     sessions=[SessionLength(sid="s", committed_len=8, cached_len=7)])
    assert reg.finish_batch("a", "other", done) is None
    finished = reg.finish_batch("a", "b1", done)
    assert finished is not None and [e.sid for e in finished.entries] == ["s"]
    assert reg.verifiers["a"].in_flight == {}
    assert reg.state("a").recent_done == (done, done)
    # The verifier's report feeds the session table: the next round is warm.
    entry = reg.sessions.get("s")
    assert (entry.committed_len, entry.cached_len) == (8, 7)
    assert reg.sessions.round_shape("s", 8, 3) == (1 + 3, 7)


def test_more_than_one_batch_in_flight_when_allowed() -> None:
    reg = registry(("a", 10))
    for sid in ("s", "t"):
        reg.assign(sid, "a", T0)
        reg.enqueue(pending(sid), T0)
    reg.start_batch("a", "b1", reg.verifiers["a"].queue[:1], T0)
    assert reg.dispatchable(max_in_flight=1) == []
    assert reg.dispatchable(max_in_flight=2) == ["a"]
    reg.start_batch("a", "b2", reg.verifiers["a"].queue[:1], T0 + 1)
    assert list(reg.verifiers["a"].in_flight) == ["b1", "b2"]
    assert reg.finish_batch("a", "b2") is not None  # done out of order is fine
    assert list(reg.verifiers["a"].in_flight) == ["b1"]
    # A death re-queues every batch in flight.
    reg.heartbeat(hb("b"), T0 + 2)
    death = reg.declare_dead("a", "heartbeat", T0 + 3)
    assert death.num_requeued == 1 and [e.sid for e in reg.verifiers["b"].queue] == ["s"]


def test_sessions_only_go_to_verifiers_whose_limits_fit() -> None:
    reg = registry()
    reg.heartbeat(hb("small", k_max=4), T0)
    reg.heartbeat(hb("other-vocab", vocab=VocabInfo(size=100, digest="f" * 16)), T0)
    reg.heartbeat(hb("big", free=1, k_max=16), T0)
    spec = SessionSpec(sid="s", mode="sled", max_new_tokens=32, k_max=8)
    entry = reg.assign("s", "big", T0, spec=spec, vocab=VOCAB, prompt_len=10)
    assert [v.verifier_id for v in reg.candidates()][0] == "other-vocab"  # most free blocks
    assert reg.pick(entry) == "big"
    assert reg.pick(None) == "other-vocab"  # needs unknown: any live verifier
    # Failover keeps to fitting verifiers: with "big" dead, "s" has nowhere to go.
    death = reg.declare_dead("big", "heartbeat", T0 + 1)
    assert death.moved_sessions == {} and reg.verifier_of("s") == "big"


# -- reassignment -----------------------------------------------------------------------------
def test_death_moves_sessions_queued_and_in_flight_entries() -> None:
    reg = registry(("a", 10), ("b", 10), ("c", 10))
    for sid in ("s1", "s2", "s3"):
        reg.assign(sid, "a", T0)
    reg.assign("other", "b", T0)
    reg.enqueue(pending("s1", arrival_ms=T0), T0)
    reg.enqueue(pending("s2", arrival_ms=T0 + 1), T0 + 1)
    reg.start_batch("a", "b1", reg.verifiers["a"].queue[:2], T0 + 2)
    reg.enqueue(pending("s3", arrival_ms=T0 + 3), T0 + 3)
    reg.enqueue(pending("s1", round=1, arrival_ms=T0 + 4), T0 + 4)

    death = reg.declare_dead("a", "heartbeat", T0 + 5)
    # Spread evenly: c has none, b has one.
    assert death.moved_sessions == {"s1": "c", "s2": "b", "s3": "c"}
    assert (death.num_requeued, death.num_orphaned) == (4, 0)
    assert reg.num_sessions("a") == 0
    assert {sid: reg.verifier_of(sid) for sid in ("s1", "s2", "s3")} == death.moved_sessions
    queues = {vid: [(e.sid, e.request.round) for e in reg.verifiers[vid].queue] for vid in "bc"}
    assert queues == {"b": [("s2", 0)], "c": [("s1", 0), ("s3", 0), ("s1", 1)]}
    assert reg.verifiers["a"].queue == [] and reg.verifiers["a"].in_flight == {}


def test_enqueue_for_a_dead_verifier_moves_the_session() -> None:
    reg = registry(("a", 10), ("b", 10))
    reg.assign("s", "a", T0)
    reg.verifiers["a"].alive = False  # declared dead before the session was known here
    vid, moved = reg.enqueue(pending("s"), T0)
    assert (vid, moved) == ("b", {"s": "b"})


# -- no live verifier -------------------------------------------------------------------------
def test_no_live_verifier_orphans_until_one_appears_then_expire() -> None:
    reg = registry(("a", 10))
    reg.assign("s", "a", T0)
    reg.assign("t", "a", T0)
    reg.enqueue(pending("s", arrival_ms=T0), T0)
    death = reg.declare_dead("a", "heartbeat", T0 + 1)
    assert death.moved_sessions == {} and death.num_orphaned == 1
    assert reg.verifier_of("s") == "a"  # nowhere better to record
    vid, moved = reg.enqueue(pending("t", arrival_ms=T0 + 2), T0 + 2)
    assert (vid, moved) == (None, {})
    assert [e.sid for e in reg.orphans] == ["s", "t"]

    reg.heartbeat(hb("b"), T0 + 3)
    touched, moved = reg.place_orphans(T0 + 3)
    assert touched == {"b"} and moved == {"s": "b", "t": "b"}
    assert reg.orphans == [] and [e.sid for e in reg.verifiers["b"].queue] == ["s", "t"]

    reg.declare_dead("b", "heartbeat", T0 + 4)
    assert [e.sid for e in reg.expire(T0 + 20_000, 30_000)] == []
    assert [e.sid for e in reg.expire(T0 + 30_001.5, 30_000)] == ["s"]
    assert [e.sid for e in reg.orphans] == ["t"]


def test_unknown_verifier_of_a_loaded_session_gets_a_grace_period() -> None:
    reg = registry()  # a scheduler that just started: no heartbeat heard yet
    reg.assign("s", "a", T0)
    assert reg.enqueue(pending("s"), T0) == (None, {})
    reg.heartbeat(hb("b"), T0 + 100)
    assert reg.place_orphans(T0 + 100) == (set(), {})  # a may still say hello
    reg.heartbeat(hb("a"), T0 + 200)
    assert reg.place_orphans(T0 + 200) == ({"a"}, {})
    reg.assign("u", "gone", T0)
    assert reg.enqueue(pending("u"), T0 + 3_001) == ("b", {"u": "b"})  # after the grace


def test_forget_and_forget_idle_and_snapshot() -> None:
    reg = registry(("a", 10))
    reg.assign("s", "a", T0)
    reg.assign("t", "a", T0)
    reg.enqueue(pending("t"), T0 + 500)
    assert reg.forget_idle(T0 + 1_000, 800) == 1
    assert reg.verifier_of("s") is None and reg.verifier_of("t") == "a"
    reg.forget("t")
    assert reg.num_sessions("a") == 0
    snap = reg.snapshot(T0 + 1_000)
    assert snap["verifiers"][0] | {"last_seen_ms_ago": 0} == {
        "id": "a", "alive": True, "model": "m", "hardware": "cpu", "free_blocks": 10,
        "total_blocks": 100, "k_max": 8, "sessions": 0, "reported_sessions": 0,
        "queue_depth": 1, "estimator": None, "in_flight": [], "last_seen_ms_ago": 0}
    assert snap["orphaned"] == 0


# -- estimator feedback and KV budget ---------------------------------------------------------
def test_advertised_estimator_is_refined_from_done_and_reset_by_new_coefficients() -> None:
    """A verifier's heartbeat brings its coefficients; its batch times refine them (only for
    batches this scheduler sent); new coefficients (a restart after recalibration) start over."""
    truth = EstimatorCoefficients(a=0.5, b_compute=0.0, b_read=0.01, c=4.0)
    reg = VerifierRegistry(now_ms=T0, guard_quantile=0.9)
    reg.heartbeat(hb("a", estimator=EstimatorCoefficients(a=0.25, b_compute=0.0, b_read=0.01,
                                                         c=2.0)), T0)
    assert reg.state("a").estimator.a == 0.25 and reg.state("a").guard_ms == 0.0
    reg.assign("s", "a", T0)
    for i in range(64):
        reg.enqueue(pending("s", round=i), T0)
        reg.start_batch("a", f"b{i}", list(reg.verifiers["a"].queue), T0)
        linear, cached = 3 + i % 7, 10 * (i % 11)
        ms = truth.a * linear + truth.b_read * cached + truth.c
        reg.finish_batch("a", f"b{i}", BatchDone(
            verifier_id="a", batch_id=f"b{i}", batch_ms=ms, size=1, num_linear=linear,
            num_interactions=linear * (linear + cached), num_cached=cached))
    state = reg.state("a")
    assert state.estimator.predict(BatchShape(5, 0, 50)) == pytest.approx(
        truth.a * 5 + truth.b_read * 50 + truth.c, rel=0.05)
    assert state.guard_ms > 0  # the prior under-predicted every early batch
    # A done for a batch not in flight (another scheduler's) teaches nothing.
    before = reg.verifiers["a"].estimator.num_observed
    reg.finish_batch("a", "unknown", BatchDone(verifier_id="a", batch_id="unknown",
                                               batch_ms=999.0, size=1, num_linear=1,
                                               num_interactions=1, num_cached=0))
    assert reg.verifiers["a"].estimator.num_observed == before
    reg.heartbeat(hb("a", estimator=truth), T0)
    assert reg.verifiers["a"].estimator.num_observed == 0 and reg.state("a").estimator.a == 0.5


def test_kv_budget_counts_free_blocks_idle_sessions_and_in_flight_claims() -> None:
    reg = registry(("a", 10))  # 10 free of 100 blocks of 16 tokens
    for sid, cached in (("idle", 40), ("busy", 100), ("flying", 16)):
        reg.assign(sid, "a", T0)
        reg.sessions.get(sid).cached_len = cached
    assert reg.state("a").kv_budget_blocks == 10 + 3 + 7 + 1  # every session is idle
    reg.enqueue(pending("busy"), T0)
    entry = pending("flying")
    entry.num_cached, entry.num_new = 16, 20  # claims 3 - 1 = 2 more blocks
    reg.enqueue(entry, T0)
    batch = reg.start_batch("a", "b1", [entry], T0)
    batch.kv_claim = kv_claim([entry], 16)
    assert batch.kv_claim == 2
    assert reg.state("a").kv_budget_blocks == 10 + 3 - 2  # busy and flying are not evictable
    reg.heartbeat(hb("a", free=0, total=0), T0)
    assert reg.state("a").kv_budget_blocks is None  # no paged cache: no block counts


def test_session_round_timing_for_the_downlink() -> None:
    reg = registry(("a", 10))
    reg.assign("s", "a", T0)
    table, entry = reg.sessions, reg.sessions.get("s")
    table.submitted(entry, 0, T0, 40.0)
    assert table.round_server_ms(entry, 0) is None  # not done yet
    table.submitted(entry, 0, T0 + 5, 35.0)  # a retry keeps the first arrival
    entry.round_done_ms = T0 + 12
    assert table.round_server_ms(entry, 0) == 12 and entry.server_budget_ms == 35.0
    assert table.round_server_ms(entry, 1) is None
    table.submitted(entry, 1, T0 + 30, None)
    assert table.round_server_ms(entry, 0) is None and entry.round_arrival_ms == T0 + 30
