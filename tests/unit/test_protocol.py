"""Wire protocol and subjects: round trips, and every class of bad input -> BAD_REQUEST."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as p
from common import subjects as s
from common.errors import ErrorCode, WispError

SID = "0123456789abcdef0123456789abcdef"


def verify_request(**overrides) -> p.VerifyRequest:
    fields = dict(sid=SID, round=3, base_len=17, draft_ids=[5, 9, 2], budget_ms=42.5,
                  draft_ms=6.0, device_id="jetson-orin.lab", draft_sparse_ids=[[5, 1], [9], [2, 3]],
                  draft_sparse_probs=[[0.75, 0.25], [1.0], [0.5, 0.5]])
    fields.update(overrides)
    return p.VerifyRequest(**fields)


def generate_done() -> p.GenerateDone:
    return p.GenerateDone(sid=SID, finish_reason="length", num_tokens=8,
                          timings=p.GenerateTimings(ttft_ms=120.0, tpot_ms=30.5, e2e_ms=333.0),
                          stats=p.GenerateStats(rounds=3, drafted=12, accepted=5))


CHUNK = p.TokenChunk(sid=SID, index=4, token_ids=[7, 8], text=" world")
DONE = generate_done()
OPEN = p.SessionOpen(sid=SID, mode="wisp", prompt_ids=[1, 2, 3], max_new_tokens=32,
                     device_id="edge-7", k_max=8,
                     sampling=p.Sampling(temperature=0.7, top_p=0.9, top_k=50, draft_top_m=4),
                     seed=7, slo=p.Slo(ttft_ms=800.0, tpot_ms=60.0))
RESULT = p.VerifyResult(sid=SID, round=3, num_drafted=3, num_accepted=2, new_tokens=[5, 9, 11],
                        committed_len=20, finished=False, queue_ms=1.5, batch_ms=12.0,
                        batch_size=4)
BATCH = p.VerifierBatch(batch_id="b-17", items=[
    p.BatchEntry(request=verify_request(), reply_to="_INBOX.abc.def", deadline_ms=1e9),
    p.BatchEntry(request=verify_request(sid="other", draft_sparse_ids=None,
                                        draft_sparse_probs=None),
                 reply_to="_INBOX.abc.xyz", deadline_ms=1e9 + 5)])
HEARTBEAT = p.Heartbeat(verifier_id="verifier-0", model="Qwen/Qwen2.5-0.5B",
                        hardware="NVIDIA-H100-80GB-HBM3", free_blocks=10, total_blocks=64,
                        num_sessions=3, ts_ms=1.7e12)
EVENT = p.Event(kind="round", ts_ms=1.7e12, sid=SID,
                fields={"k": 4, "delta": -2, "acc": 0.5, "mode": "wisp", "greedy": True,
                        "note": None})
PREDICTOR = p.PredictorUpdated(version=3, object_name="predictor-v3.onnx", sha256="ab" * 32)

MESSAGES = [
    p.GenerateRequest(max_new_tokens=64, prompt="def fib(n):"),
    p.GenerateRequest(max_new_tokens=8, mode="ucb", prompt_ids=[1, 2, 3],
                      slo=p.Slo(ttft_ms=500.0, tpot_ms=50.0), temperature=0.8, top_p=0.95,
                      top_k=40, seed=2**64 - 1, k_max=8, policy="wisp-predictor",
                      device_profile="raspberry-pi-5"),
    CHUNK,
    DONE,
    p.GenerateDone(sid=SID, finish_reason="error", num_tokens=0,
                   timings=p.GenerateTimings(ttft_ms=0.0, tpot_ms=0.0, e2e_ms=1.0),
                   stats=p.GenerateStats(rounds=0, drafted=0, accepted=0),
                   error=p.ErrorInfo(code=ErrorCode.CAPACITY, message="no KV room")),
    OPEN,
    p.SessionOpen(sid=SID, mode="sled", prompt_ids=[0], max_new_tokens=1, device_id="e",
                  k_max=4),
    p.SessionOpened(sid=SID, verifier_id="verifier-0", committed_len=3),
    p.SessionClose(sid=SID),
    p.SessionClosed(sid=SID),
    verify_request(),
    verify_request(draft_ids=[], draft_sparse_ids=None, draft_sparse_probs=None,
                   budget_ms=-3.0),
    RESULT,
    BATCH,
    p.BatchDone(verifier_id="verifier-0", batch_id="b-17", batch_ms=11.2, size=2,
                num_linear=9, num_interactions=180, num_cached=34),
    HEARTBEAT,
    EVENT,
    p.Event(kind="batch", ts_ms=0.0),
    PREDICTOR,
    p.ErrorReply(error=p.ErrorInfo(code=ErrorCode.BASE_MISMATCH, message="base 3 != 4")),
]


def wire(msg) -> dict:
    return msgpack.unpackb(p.encode(msg))


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def bad(cls, data: bytes, *needles: str) -> str:
    with pytest.raises(WispError) as info:
        p.decode(cls, data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    for needle in needles:
        assert needle in info.value.message, info.value.message
    return info.value.message


def with_fields(msg, **changes) -> bytes:
    obj = wire(msg)
    for key, value in changes.items():
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return pack(obj)


# -- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    obj = wire(msg)
    assert obj["v"] == 1
    assert p.decode(type(msg), p.encode(msg)) == msg


def test_every_message_class_has_a_round_trip_case():
    classes = {p.GenerateRequest, p.TokenChunk, p.GenerateDone, p.SessionOpen, p.SessionOpened,
               p.SessionClose, p.SessionClosed, p.VerifyRequest, p.VerifyResult,
               p.VerifierBatch, p.BatchDone, p.Heartbeat, p.Event, p.PredictorUpdated,
               p.ErrorReply}
    assert classes <= {type(m) for m in MESSAGES}


def test_optional_fields_default_and_int_accepted_for_float():
    msg = p.decode(p.GenerateRequest, pack({"v": 1, "max_new_tokens": 4, "prompt_ids": [1]}))
    assert msg == p.GenerateRequest(max_new_tokens=4, prompt_ids=[1])
    assert (msg.mode, msg.temperature, msg.top_p, msg.seed) == ("wisp", 0.0, 1.0, None)
    req = p.decode(p.VerifyRequest, with_fields(verify_request(), budget_ms=12, draft_ms=0))
    assert req.budget_ms == 12.0 and type(req.budget_ms) is float
    assert type(req.draft_ms) is float
    probs = [[1, 0], [1], [0, 1]]  # ints where probabilities (floats) are expected
    req = p.decode(p.VerifyRequest, with_fields(verify_request(), draft_sparse_probs=probs))
    assert req.draft_sparse_probs == [[1.0, 0.0], [1.0], [0.0, 1.0]]
    assert all(type(x) is float for row in req.draft_sparse_probs for x in row)


ids = st.integers(0, 200_000)
probs = st.floats(0.0, 1.0)


@st.composite
def verify_requests(draw):
    k = draw(st.integers(0, p.MAX_DRAFT_TOKENS))
    draft = draw(st.lists(ids, min_size=k, max_size=k))
    sparse_ids = sparse_probs = None
    if draw(st.booleans()):
        ms = draw(st.lists(st.integers(1, 5), min_size=k, max_size=k))
        sparse_ids = [draw(st.lists(ids, min_size=m, max_size=m)) for m in ms]
        sparse_probs = [draw(st.lists(probs, min_size=m, max_size=m)) for m in ms]
    return p.VerifyRequest(
        sid=draw(st.from_regex(s.SAFE_TOKEN_RE, fullmatch=True)), round=draw(ids),
        base_len=draw(ids), draft_ids=draft,
        budget_ms=draw(st.floats(allow_nan=False, allow_infinity=False)),
        draft_ms=draw(st.floats(0.0, 1e6)), device_id=draw(st.from_regex(s.NAME_RE, fullmatch=True)),
        draft_sparse_ids=sparse_ids, draft_sparse_probs=sparse_probs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(verify_requests())
def test_verify_request_round_trip_property(req):
    assert p.decode(p.VerifyRequest, p.encode(req)) == req


# -- bad input: every problem is BAD_REQUEST naming it ----------------------------------------
def test_garbage_and_non_map_payloads():
    bad(p.VerifyRequest, b"\xc1\x00garbage", "not valid msgpack")
    bad(p.VerifyRequest, b"\x92\x01", "not valid msgpack")  # truncated array
    bad(p.VerifyRequest, b"", "empty")
    bad(p.VerifyRequest, pack([1, 2, 3]), "must be a msgpack map, got list")
    bad(p.VerifyRequest, pack("hello"), "must be a msgpack map, got str")
    bad(p.VerifyRequest, p.encode(verify_request()) + b"\x00", "extra bytes")
    bad(p.SessionClose, pack({1: 2}), "not valid msgpack")  # non-str map key
    bad(p.SessionClose, pack({"v": 1, "sid": msgpack.ExtType(1, b"x")}), "ext type")
    bad(p.SessionClose, b"\x82\xa1v\x01\xa3sid\xa2\xff\xfe", "not valid msgpack")  # bad UTF-8
    with pytest.raises(WispError) as info:
        p.decode(p.SessionClose, "not bytes")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_version_checked():
    bad(p.SessionClose, pack({"sid": SID}), "missing field 'v'")
    bad(p.SessionClose, pack({"v": 2, "sid": SID}), "unsupported protocol version 2")
    bad(p.SessionClose, pack({"v": True, "sid": SID}), "unsupported protocol version True")


def test_missing_and_unknown_fields():
    bad(p.VerifyRequest, with_fields(verify_request(), sid=KeyError),
        "VerifyRequest: missing required field 'sid'")
    msg = bad(p.VerifyRequest, with_fields(verify_request(), draft_idz=[1]),
              "unknown field 'draft_idz'")
    assert "did you mean 'draft_ids'" in msg
    bad(p.SessionClose, pack({"v": 1, "sid": SID, "error": {}}), "unknown field 'error'")


@pytest.mark.parametrize("field,value,needle", [
    ("round", True, "VerifyRequest.round: expected int, got bool"),
    ("round", "3", "VerifyRequest.round: expected int, got str"),
    ("round", 3.0, "VerifyRequest.round: expected int, got float"),
    ("base_len", None, "VerifyRequest.base_len: expected int, got null"),
    ("draft_ids", [1, True], "VerifyRequest.draft_ids[1]: expected int, got bool"),
    ("draft_ids", "abc", "VerifyRequest.draft_ids: expected list, got str"),
    ("budget_ms", True, "VerifyRequest.budget_ms: expected float, got bool"),
    ("budget_ms", "1.0", "VerifyRequest.budget_ms: expected float, got str"),
    ("sid", b"bytes", "VerifyRequest.sid: expected str, got bytes"),
    ("sid", 12, "VerifyRequest.sid: expected str, got int"),
])
def test_wrong_types(field, value, needle):
    bad(p.VerifyRequest, with_fields(verify_request(), **{field: value}), needle)


@pytest.mark.parametrize("changes,needle", [
    (dict(draft_ids=[5, -1, 2]), "VerifyRequest.draft_ids[1]: must be >= 0, got -1"),
    (dict(base_len=-4), "VerifyRequest.base_len: must be >= 0"),
    (dict(round=-1), "VerifyRequest.round: must be >= 0"),
    (dict(draft_sparse_ids=[[5, -3], [9], [2, 3]]),
     "VerifyRequest.draft_sparse_ids[0][1]: must be >= 0, got -3"),
    (dict(budget_ms=math.nan), "VerifyRequest.budget_ms: must be a finite number, got nan"),
    (dict(budget_ms=math.inf), "VerifyRequest.budget_ms: must be a finite number, got inf"),
    (dict(draft_ms=-1.0), "VerifyRequest.draft_ms: must be >= 0.0"),
    (dict(draft_sparse_probs=[[0.75, 1.25], [1.0], [0.5, 0.5]]),
     "VerifyRequest.draft_sparse_probs[0][1]: must be <= 1.0, got 1.25"),
    (dict(draft_sparse_probs=[[0.75, math.nan], [1.0], [0.5, 0.5]]),
     "VerifyRequest.draft_sparse_probs[0][1]: must be a finite number, got nan"),
    (dict(draft_sparse_probs=[[0.75, -0.0001], [1.0], [0.5, 0.5]]),
     "VerifyRequest.draft_sparse_probs[0][1]: must be >= 0.0"),
    (dict(sid="a.b"), "VerifyRequest.sid: must be 1-128 characters"),
    (dict(sid="*"), "VerifyRequest.sid: must be"),
    (dict(sid=""), "VerifyRequest.sid: must be"),
    (dict(device_id="has space"), "VerifyRequest.device_id: must be"),
    (dict(round=2**64), None),  # msgpack itself cannot carry it: see below
])
def test_ranges_and_ids(changes, needle):
    if needle is None:
        with pytest.raises(OverflowError):
            with_fields(verify_request(), **changes)
        return
    bad(p.VerifyRequest, with_fields(verify_request(), **changes), needle)


def test_draft_and_sparse_sizes():
    k = p.MAX_DRAFT_TOKENS + 1
    bad(p.VerifyRequest, with_fields(verify_request(), draft_ids=[1] * k, draft_sparse_ids=None,
                                     draft_sparse_probs=None),
        f"VerifyRequest.draft_ids: has {k} entries; the limit is {p.MAX_DRAFT_TOKENS}")
    m = p.MAX_SPARSE_M + 1
    one = verify_request(draft_ids=[1], draft_sparse_ids=[[1]], draft_sparse_probs=[[1.0]])
    bad(p.VerifyRequest, with_fields(one, draft_sparse_ids=[[1] * m],
                                     draft_sparse_probs=[[0.0] * m]),
        "VerifyRequest.draft_sparse_ids[0]: has 65 entries; the limit is 64")
    bad(p.VerifyRequest, with_fields(verify_request(), draft_sparse_ids=[[5], [], [2]],
                                     draft_sparse_probs=[[1.0], [], [1.0]]),
        "VerifyRequest.draft_sparse_ids[1]: must not be empty")


def test_mismatched_sparse_shapes():
    req = verify_request()
    bad(p.VerifyRequest, with_fields(req, draft_sparse_probs=None),
        "draft_sparse_ids and draft_sparse_probs must both be given or both be absent")
    bad(p.VerifyRequest, with_fields(req, draft_sparse_ids=KeyError),
        "must both be given or both be absent")
    bad(p.VerifyRequest, with_fields(req, draft_sparse_ids=[[5], [9]],
                                     draft_sparse_probs=[[1.0], [1.0]]),
        "draft_sparse_ids has 2 rows; it needs one row per drafted token (3)")
    bad(p.VerifyRequest, with_fields(req, draft_sparse_probs=[[0.75], [1.0], [0.5, 0.5]]),
        "row 0: draft_sparse_ids has 2 entries but draft_sparse_probs has 1")


def test_oversized_payload_refused_before_unpacking():
    data = b"\x91" + b"\x00" * p.MAX_PAYLOAD_BYTES  # valid-looking prefix, too long
    bad(p.VerifyRequest, data, f"the limit is {p.MAX_PAYLOAD_BYTES}")
    huge = p.VerifierBatch(batch_id="b", items=[
        p.BatchEntry(request=verify_request(draft_ids=[1] * 64, draft_sparse_ids=[[1] * 64] * 64,
                                            draft_sparse_probs=[[0.5] * 64] * 64),
                     reply_to="_INBOX.x", deadline_ms=0.0)] * 120)
    with pytest.raises(WispError, match="exceed the payload limit") as info:
        p.encode(huge)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_generate_request_rules():
    base = {"v": 1, "max_new_tokens": 4}
    bad(p.GenerateRequest, pack(base | {"prompt": "hi", "prompt_ids": [1]}),
        "give exactly one of prompt (text) and prompt_ids, not both")
    bad(p.GenerateRequest, pack(base), "got neither")
    ok = base | {"prompt": "hi"}
    bad(p.GenerateRequest, pack(ok | {"mode": "turbo"}),
        "GenerateRequest.mode: must be one of 'wisp', 'sled', 'ucb', 'centralized', "
        "'colocated', got 'turbo'")
    bad(p.GenerateRequest, pack(ok | {"max_new_tokens": 0}), "max_new_tokens: must be >= 1")
    bad(p.GenerateRequest, pack(ok | {"temperature": -0.1}), "temperature: must be >= 0.0")
    bad(p.GenerateRequest, pack(ok | {"top_p": 0.0}), "top_p: must be > 0.0")
    bad(p.GenerateRequest, pack(ok | {"top_p": 1.5}), "top_p: must be <= 1.0")
    bad(p.GenerateRequest, pack(ok | {"top_k": -1}), "top_k: must be >= 0")
    bad(p.GenerateRequest, pack(ok | {"k_max": p.MAX_DRAFT_TOKENS + 1}), "k_max: must be <=")
    bad(p.GenerateRequest, pack(ok | {"prompt": ""}), "GenerateRequest.prompt: must not be empty")
    bad(p.GenerateRequest, pack(ok | {"prompt": "a" * (p.MAX_PROMPT_CHARS + 1)}),
        f"GenerateRequest.prompt: has {p.MAX_PROMPT_CHARS + 1} characters")
    bad(p.GenerateRequest, pack(base | {"prompt_ids": [0] * (p.MAX_PROMPT_IDS + 1)}),
        f"prompt_ids: has {p.MAX_PROMPT_IDS + 1} entries; the limit is {p.MAX_PROMPT_IDS}")
    bad(p.GenerateRequest, pack(ok | {"slo": {"ttft_ms": 100}}),
        "GenerateRequest.slo: missing required field 'tpot_ms'")
    bad(p.GenerateRequest, pack(ok | {"slo": [100, 50]}), "GenerateRequest.slo: expected map")


def test_nested_errors_name_the_path():
    batch = wire(BATCH)
    batch["items"][1]["request"]["draft_ids"][0] = -7
    bad(p.VerifierBatch, pack(batch),
        "VerifierBatch.items[1].request.draft_ids[0]: must be >= 0, got -7")
    batch = wire(BATCH)
    batch["items"][0]["reply_to"] = "_INBOX.*"
    bad(p.VerifierBatch, pack(batch), "VerifierBatch.items[0].reply_to: must be a subject")
    batch["items"] = []
    bad(p.VerifierBatch, pack(batch), "VerifierBatch.items: must not be empty")
    event = wire(EVENT)
    event["fields"]["x"] = [1, 2]
    bad(p.Event, pack(event), "Event.fields['x']: expected int or float or str or bool or null")
    event = wire(EVENT) | {"kind": "a.b"}
    bad(p.Event, pack(event), "Event.kind: must be")


def test_cross_field_rules_of_replies():
    bad(p.VerifyResult, with_fields(RESULT, num_accepted=4), "num_accepted (4) exceeds")
    bad(p.Heartbeat, with_fields(HEARTBEAT, free_blocks=65), "free_blocks (65) exceeds")
    bad(p.PredictorUpdated, with_fields(PREDICTOR, sha256="XYZ"), "64 lowercase hex digits")
    bad(p.ErrorReply, pack({"v": 1, "error": {"code": "nope", "message": "m"}}),
        "ErrorReply.error.code: must be one of")


def test_fuzzed_bytes_only_ever_raise_bad_request():
    import random

    rng = random.Random(7)
    valid = p.encode(verify_request())
    for _ in range(300):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            p.decode(p.VerifyRequest, bytes(data[: rng.randint(1, len(data))]))
        except WispError as err:
            assert err.code is ErrorCode.BAD_REQUEST


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["sid", "round", "base_len", "draft_ids", "budget_ms",
                                        "draft_ms", "device_id", "draft_sparse_ids",
                                        "draft_sparse_probs", "typo"]), wire_values),
       st.data())
def test_fuzzed_maps_only_ever_raise_bad_request(changes, data):
    obj = wire(verify_request()) | changes
    cls = data.draw(st.sampled_from([p.VerifyRequest, p.VerifierBatch, p.GenerateRequest]))
    try:
        msg = p.decode(cls, pack(obj))
    except WispError as err:
        assert err.code is ErrorCode.BAD_REQUEST
    else:
        assert p.decode(cls, p.encode(msg)) == msg


# -- encoding checks too -----------------------------------------------------------------------
def test_encode_refuses_invalid_messages():
    with pytest.raises(WispError, match="cannot encode GenerateRequest: .*not both") as info:
        p.encode(p.GenerateRequest(max_new_tokens=1, prompt="x", prompt_ids=[1]))
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(WispError, match=r"VerifyRequest.draft_ids\[0\]: must be >= 0"):
        p.encode(verify_request(draft_ids=[-1, 2, 3]))
    with pytest.raises(WispError, match="does not fit in 64 bits"):
        p.encode(p.SessionOpened(sid=SID, verifier_id="v", committed_len=2**70))


# -- replies ------------------------------------------------------------------------------------
def test_decode_reply_raises_the_carried_error():
    data = p.error_reply(WispError(ErrorCode.DRAFT_TOO_LONG, "k=20 > k_max=16"))
    assert wire_of(data) == {"v": 1, "error": {"code": "draft_too_long",
                                               "message": "k=20 > k_max=16"}}
    with pytest.raises(WispError) as info:
        p.decode_reply(p.VerifyResult, data)
    assert info.value.code is ErrorCode.DRAFT_TOO_LONG
    assert info.value.message == "k=20 > k_max=16"
    result = RESULT
    assert p.decode_reply(p.VerifyResult, p.encode(result)) == result


def test_decode_reply_unknown_code_and_garbage():
    with pytest.raises(WispError) as info:
        p.decode_reply(p.SessionOpened, pack({"v": 1, "error": {"code": "from_the_future",
                                                                "message": "m"}}))
    assert info.value.code is ErrorCode.INTERNAL and "from_the_future" in info.value.message
    with pytest.raises(WispError) as info:
        p.decode_reply(p.SessionOpened, b"\xc1")
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_decode_reply_picks_among_stream_messages():
    chunk, done = CHUNK, DONE
    kinds = (p.TokenChunk, p.GenerateDone)
    assert p.decode_reply(kinds, p.encode(chunk)) == chunk
    assert p.decode_reply(kinds, p.encode(done)) == done
    with pytest.raises(WispError, match="missing required field 'text'"):
        p.decode_reply(kinds, with_fields(chunk, text=KeyError))
    with pytest.raises(WispError) as info:
        p.decode_reply(kinds, p.error_reply(WispError(ErrorCode.UNKNOWN_SESSION, "gone")))
    assert info.value.code is ErrorCode.UNKNOWN_SESSION


def test_error_reply_truncates_long_messages():
    data = p.error_reply(WispError(ErrorCode.INTERNAL, "x" * 10_000))
    message = wire_of(data)["error"]["message"]
    assert len(message) == p.MAX_ERROR_MESSAGE_CHARS and message.endswith("...")


def wire_of(data: bytes) -> dict:
    return msgpack.unpackb(data)


# -- conversions to and from the cores --------------------------------------------------------
def test_core_conversions():
    from services.edge_drafter.core import Draft
    from services.gpu_verifier.core import VerifyItem, VerifyOutcome

    req = verify_request()
    assert req.to_item() == VerifyItem(sid=SID, round=3, base_len=17, draft_ids=[5, 9, 2],
                                       draft_sparse_ids=[[5, 1], [9], [2, 3]],
                                       draft_sparse_probs=[[0.75, 0.25], [1.0], [0.5, 0.5]])
    outcome = VerifyOutcome(sid=SID, round=3, num_drafted=3, num_accepted=2,
                            new_tokens=[5, 9, 11], committed_len=20, finished=False,
                            num_input_tokens=4, num_cached_tokens=16)
    assert p.VerifyResult.from_outcome(outcome, 1.5, 12.0, 4) == RESULT
    draft = Draft(sid=SID, base_len=17, token_ids=[5, 9, 2], sparse_ids=req.draft_sparse_ids,
                  sparse_probs=req.draft_sparse_probs, token_times_s=[0.002, 0.002, 0.002])
    from_draft = p.VerifyRequest.from_draft(draft, round=3, budget_ms=42.5,
                                            device_id="jetson-orin.lab")
    assert from_draft.draft_ms == pytest.approx(6.0)
    assert p.decode(p.VerifyRequest, p.encode(from_draft)).draft_ids == [5, 9, 2]
    spec = OPEN.to_spec(committed_output=[4])
    assert (spec.sid, spec.prompt_ids, spec.max_new_tokens, spec.seed,
            spec.committed_output) == (SID, [1, 2, 3], 32, 7, [4])
    assert spec.params.temperature == 0.7 and spec.params.draft_top_m == 4
    assert p.Sampling.from_params(spec.params) == OPEN.sampling


def test_new_sid_is_128_bit_and_safe():
    sid = p.new_sid()
    assert len(sid) == 32 and s.is_safe_token(sid) and sid != p.new_sid()


# -- subjects and keys --------------------------------------------------------------------------
def test_subjects_and_keys():
    assert s.GENERATE_EDGE == "wisp.edge.generate"
    assert s.verifier_batch("verifier-0") == "wisp.verifier.verifier-0.batch"
    assert s.verifier_done("verifier-0") == "wisp.verifier.verifier-0.done"
    assert s.event(s.EVENT_ROUND) == "wisp.events.round"
    assert s.session_key(SID) == f"wisp:sess:{SID}"
    assert s.session_tokens_key(SID) == f"wisp:sess:{SID}:tokens"
    assert s.estimator_key("Qwen/Qwen2.5-0.5B", "NVIDIA-H100") == \
        "wisp:estimator:Qwen/Qwen2.5-0.5B:NVIDIA-H100"
    assert s.to_name("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert s.to_name("  ") == "unknown"
    assert s.deadline_member(SID, 12) == f"{SID}:12"
    assert s.parse_deadline_member(f"{SID}:12".encode()) == (SID, 12)


@pytest.mark.parametrize("unsafe", ["a.b", "a b", "*", ">", "", "x:tokens", "a\n", "é",
                                    "x" * 129, None, 5])
def test_builders_reject_unsafe_ids(unsafe):
    for build in (s.verifier_batch, s.verifier_done, s.event, s.session_key,
                  s.session_tokens_key):
        with pytest.raises(ValueError):
            build(unsafe)
    with pytest.raises(ValueError):
        s.deadline_member(unsafe, 1)


def test_name_and_member_checks():
    for model, hardware in [("a b", "h"), ("m", "h:1"), ("m", "*"), ("", "h")]:
        with pytest.raises(ValueError):
            s.estimator_key(model, hardware)
    for member in ["nocolon", "a.b:1", f"{SID}:-1", f"{SID}:x", f"{SID}:²"]:
        with pytest.raises(ValueError):
            s.parse_deadline_member(member)
    with pytest.raises(ValueError):
        s.deadline_member(SID, True)
    assert s.is_publish_subject("_INBOX.abc.def")
    assert not s.is_publish_subject("_INBOX..x") and not s.is_publish_subject("a.>")
