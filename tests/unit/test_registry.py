"""Verifier registry: routing, liveness, reassignment of sessions and work, orphans."""

from __future__ import annotations

from common.protocol import (
    BatchDone,
    Heartbeat,
    ModelLimits,
    SessionLength,
    SessionSpec,
    VerifyRequest,
    VocabInfo,
)
from services.admission_scheduler.batching import PendingVerify
from services.admission_scheduler.registry import VerifierRegistry

T0 = 1_000_000.0  # ms
VOCAB = VocabInfo(size=100, digest="0123456789abcdef")


def limits(k_max: int = 8, context: int = 2048, vocab: VocabInfo = VOCAB) -> ModelLimits:
    return ModelLimits(vocab=vocab, k_max=k_max, max_context=context, max_prompt_tokens=1024)


def hb(vid: str, free: int = 100, total: int = 100, **kw) -> Heartbeat:
    return Heartbeat(verifier_id=vid, model="m", hardware="cpu", free_blocks=free,
                     total_blocks=total, block_size=16, num_sessions=0,
                     limits=limits(**kw), ts_ms=0.0)


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
    assert reg.verifiers["a"].state().recent_done == (done, done)
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
        "queue_depth": 1, "in_flight": [], "last_seen_ms_ago": 0}
    assert snap["orphaned"] == 0
