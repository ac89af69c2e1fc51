"""SessionStore on a real Redis: the atomic round commit, and writes that never resurrect a
session that is gone."""

from common.protocol import SessionSpec
from common.store import CommitStatus, SessionRecord, SessionStore
from common.subjects import session_key, session_tokens_key


def record(sid: str, tokens: list[int], max_new_tokens: int = 8) -> SessionRecord:
    return SessionRecord(spec=SessionSpec(sid=sid, mode="sled", max_new_tokens=max_new_tokens),
                         prompt_len=len(tokens), tokens=tokens)


async def test_commit_appends_once_and_refuses_a_stale_base(redis_client):
    store = SessionStore(redis_client)
    await store.create(record("s", [5, 6]))
    assert await store.commit_round("s", 0, 2, [7, 8], b"r0", False) == (CommitStatus.APPLIED, 4)
    assert await store.commit_round("s", 0, 2, [7, 8], b"r0", False) == (CommitStatus.REPLAYED, 4)
    assert await store.commit_round("s", 1, 2, [9], b"r1", False) == (CommitStatus.MISMATCH, 4)
    assert await store.commit_round("x", 0, 2, [9], b"r", False) == (CommitStatus.MISSING, 0)
    loaded = await store.load("s")
    assert loaded.tokens == [5, 6, 7, 8] and loaded.last_result == b"r0"


async def test_updates_and_close_leave_no_trace_of_a_missing_session(redis_client):
    store = SessionStore(redis_client)
    assert not await store.set_fields("gone", verifier_id="v1")
    assert not await store.close("gone")
    assert not await redis_client.exists(session_key("gone"), session_tokens_key("gone"))

    await store.create(record("s", [3], 4))
    assert await store.set_fields("s", verifier_id="v2")
    assert await store.close("s")
    loaded = await store.load("s")
    assert loaded.verifier_id == "v2" and loaded.state == "closed"
    assert 0 < await redis_client.ttl(session_key("s")) <= 60
