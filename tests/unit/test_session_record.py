"""SessionRecord: the Redis hash round trip and the seeds of rebuilt sessions."""

from common.store import SessionRecord


def record(**kw) -> SessionRecord:
    base = dict(sid="s", mode="sled", prompt_len=3, max_new_tokens=8, tokens=[1, 2, 3])
    return SessionRecord(**{**base, **kw})


def test_hash_round_trip_keeps_every_field():
    r = record(verifier_id="v1", temperature=0.7, top_k=5, seed=42, slo_tpot_ms=50.0,
               last_round=4, last_result=b"\x81\xa1v\x01", state="finished")
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in r.to_hash().items()}
    back = SessionRecord.from_hash("s", raw, [b"1", b"2", b"3"])
    assert back == r


def test_a_fresh_session_keeps_its_seed_and_a_rebuilt_one_gets_a_derived_one():
    assert record(seed=42).rebuild_seed() == 42
    assert record(seed=-1).rebuild_seed() is None
    rebuilt = record(seed=42, tokens=[1, 2, 3, 9, 9])
    assert rebuilt.rebuild_seed() not in (None, 42)
    assert rebuilt.rebuild_seed() == record(seed=42, tokens=[1, 2, 3, 7, 7]).rebuild_seed()
    assert rebuilt.rebuild_seed() != record(seed=42, tokens=[1, 2, 3, 9]).rebuild_seed()


def test_sampling_params_come_from_the_record():
    p = record(temperature=0.5, top_p=0.9, top_k=3, draft_top_m=4).sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.draft_top_m) == (0.5, 0.9, 3, 4)
