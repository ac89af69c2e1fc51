"""SessionRecord: the Redis hash round trip, and the seeds of rebuilt sessions."""

import pytest

from common.protocol import SamplingParams, SessionSpec, Slo, VocabInfo
from common.sampling import session_seed
from common.store import SessionRecord


def record(**kw) -> SessionRecord:
    spec = SessionSpec(sid="s", mode="sled", max_new_tokens=8, seed=42,
                       sampling=SamplingParams(temperature=0.7, top_k=5),
                       slo=Slo(ttft_ms=500.0, tpot_ms=50.0), device_id="edge-1")
    return SessionRecord(**{"spec": spec, "prompt_len": 3, "tokens": [1, 2, 3], **kw})


def as_redis(r: SessionRecord) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in r.to_hash().items()}


def test_hash_round_trip_keeps_every_field():
    r = record(verifier_id="v1", vocab=VocabInfo(size=97, digest="0123456789abcdef"),
               last_round=4, last_result=b"\x81\xa1v\x01", state="finished", created_ms=5.5)
    back = SessionRecord.from_hash(as_redis(r), [b"1", b"2", b"3"])
    assert back == r
    # No hand-kept field list: every struct field but the token list is a hash field.
    assert set(r.to_hash()) == set(SessionRecord.__struct_fields__) - {"tokens"}


def test_a_corrupt_hash_is_a_value_error():
    raw = as_redis(record())
    raw[b"committed_len"] = b"many"
    with pytest.raises(ValueError, match="not a session record"):
        SessionRecord.from_hash(raw, [])


def test_a_fresh_session_keeps_its_seed_and_a_rebuilt_one_gets_a_derived_one():
    assert session_seed(42, 3, 3) == 42
    assert session_seed(None, 5, 3) is None
    rebuilt = session_seed(42, 5, 3)
    assert rebuilt not in (None, 42)
    assert rebuilt == session_seed(42, 5, 3)  # the same on every process
    assert rebuilt != session_seed(42, 4, 3)
