"""Wire protocol and subjects: round trips, type tags, and every class of bad input ->
BAD_REQUEST naming the field (this is the boundary: what passes is trusted downstream)."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as p
from common import subjects as s
from common.errors import ErrorCode, WispError

SID = "0123456789abcdef0123456789abcdef"
VOCAB = p.VocabInfo(size=4096, digest="0123456789abcdef")
LIMITS = p.ModelLimits(vocab=VOCAB, k_max=8, max_context=2048, max_prompt_tokens=1024)


def verify_request(**overrides) -> p.VerifyRequest:
    fields = dict(sid=SID, round=3, base_len=17, draft_ids=[5, 9, 2], budget_ms=42.5,
                  draft_ms=6.0, device_id="jetson-orin.lab", draft_sparse_ids=[[5, 1], [9, 4],
                                                                              [2, 3]],
                  draft_sparse_probs=[[0.75, 0.25], [1.0, 0.0], [0.5, 0.5]],
                  draft_features=[[0.9, 0.1, 0.5, 0.01, 0.0, 0.9, 1.0],
                                  [0.8, 0.2, 0.4, 0.01, 1.0, 0.72, 1.0],
                                  [0.7, 0.3, 0.3, 0.01, 2.0, 0.5, 1.0]])
    fields.update(overrides)
    return p.VerifyRequest(**fields)


SPEC = p.SessionSpec(sid=SID, mode="wisp", max_new_tokens=32, k_max=8, seed=7,
                     sampling=p.SamplingParams(temperature=0.7, top_p=0.9, top_k=50,
                                               draft_top_m=4),
                     slo=p.Slo(ttft_ms=800.0, tpot_ms=60.0), device_id="edge-7")
CHUNK = p.TokenChunk(sid=SID, index=4, token_ids=[7, 8], text=" world")
DONE = p.GenerateDone(sid=SID, finish_reason="length", num_tokens=8,
                      timings=p.GenerateTimings(ttft_ms=120.0, tpot_ms=30.5, e2e_ms=333.0),
                      stats=p.GenerateStats(rounds=3, drafted=12, accepted=5))
RESULT = p.VerifyResult(sid=SID, round=3, num_drafted=3, num_accepted=2, new_tokens=[5, 9, 11],
                        committed_len=20, finished=False, queue_ms=1.5, batch_ms=12.0,
                        batch_size=4)
BATCH = p.VerifierBatch(batch_id="b-17", items=[
    p.BatchEntry(request=verify_request(), reply_to="_INBOX.abc.def"),
    p.BatchEntry(request=verify_request(sid="other", draft_sparse_ids=None,
                                        draft_sparse_probs=None, draft_features=None),
                 reply_to="_INBOX.abc.xyz")])
HEARTBEAT = p.Heartbeat(verifier_id="verifier-0", model="Qwen/Qwen2.5-0.5B",
                        hardware="NVIDIA-H100-80GB-HBM3", free_blocks=10, total_blocks=64,
                        block_size=16, num_sessions=3, limits=LIMITS, ts_ms=1.7e12)
PREDICTOR = p.PredictorUpdated(version=3, object_name="predictor-v3.onnx", sha256="ab" * 32)

MESSAGES = [
    p.GenerateRequest(max_new_tokens=64, prompt="def fib(n):"),
    p.GenerateRequest(max_new_tokens=8, mode="ucb", prompt_ids=[1, 2, 3],
                      slo=p.Slo(ttft_ms=500.0, tpot_ms=50.0),
                      sampling=p.SamplingParams(temperature=0.8, top_p=0.95, top_k=40),
                      seed=2**64 - 1, k_max=8, policy="wisp-predictor",
                      device_profile="raspberry-pi-5"),
    CHUNK,
    DONE,
    p.GenerateDone(sid=SID, finish_reason="error", num_tokens=0,
                   timings=p.GenerateTimings(ttft_ms=0.0, tpot_ms=0.0, e2e_ms=1.0),
                   stats=p.GenerateStats(),
                   error=p.ErrorInfo(code="capacity", message="no KV room")),
    p.SessionOpen(spec=SPEC, prompt_ids=[1, 2, 3], vocab=VOCAB),
    p.SessionOpen(spec=p.SessionSpec(sid=SID, mode="sled", max_new_tokens=1), prompt_ids=[0],
                  vocab=VOCAB),
    p.SessionOpened(sid=SID, verifier_id="verifier-0", committed_len=3),
    p.SessionClose(sid=SID),
    p.SessionClosed(sid=SID),
    verify_request(),
    verify_request(draft_ids=[], draft_sparse_ids=None, draft_sparse_probs=None,
                   draft_features=None, budget_ms=-3.0),
    RESULT,
    BATCH,
    p.BatchDone(verifier_id="verifier-0", batch_id="b-17", batch_ms=11.2, size=2,
                num_linear=9, num_interactions=180, num_cached=34,
                sessions=[p.SessionLength(sid=SID, committed_len=20, cached_len=19)]),
    HEARTBEAT,
    p.Heartbeat(verifier_id="verifier-1", model="tiny-target", hardware="x86_64-2threads",
                free_blocks=0, total_blocks=0, block_size=1, num_sessions=0,
                limits=HEARTBEAT.limits, ts_ms=0.0,
                estimator=p.EstimatorCoefficients(a=0.03, b_compute=1e-4, b_read=3e-3, c=0.6)),
    p.ScheduleEvent(ts_ms=0.0, verifier_id="v0", batch_id="b", policy="wisp", size=3,
                    predicted_ms=4.2, observed_ms=4.0, guard_ms=0.3, decision_ms=0.05,
                    deadlines_met=2, deadlines_missed=1, late_dispatched=1),
    p.AdmissionEvent(ts_ms=0.0, sid=SID, outcome="refused", verifier_id="v0",
                     predicted_round_ms=80.0, budget_ms=60.0, retry_after_ms=1500.0),
    p.RefusalEvent(ts_ms=0.0, code="overloaded", mode="wisp", sid=SID, retry_after_ms=1500.0),
    p.RefusalEvent(ts_ms=0.0, code="unknown_session"),  # mode unknown (a resume)
    p.RequestEvent(ts_ms=1.7e12, sid=SID, mode="sled", num_tokens=8, timings=DONE.timings,
                   slo=None, stats=DONE.stats, finish_reason="eos"),
    p.RoundEvent(ts_ms=1.7e12, sid=SID, mode="wisp", round=2, drafted=4, accepted=3,
                 committed=4, draft_ms=3.0, wasted_draft_ms=0.7, rtt_ms=9.0, budget_ms=-1.0,
                 batch_size=5),
    p.VerdictEvent(ts_ms=0.0, sid=SID, round=2, device_id="edge-7", greedy=True, num_drafted=3,
                   num_accepted=1, draft_features=verify_request().draft_features),
    p.BatchEvent(ts_ms=0.0, verifier_id="v0", batch_id="b", size=3, batch_ms=4.0, num_linear=9,
                 num_interactions=100, num_cached=30, queue_depth=0),
    p.ErrorEvent(ts_ms=0.0, service="gpu-verifier", code="bad_request"),
    PREDICTOR,
    p.ErrorReply(error=p.ErrorInfo(code="base_mismatch", message="base 3 != 4")),
]


def wire(msg) -> dict:
    return msgspec.msgpack.decode(p.encode(msg))


def pack(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


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


# -- round trips and tags -----------------------------------------------------------------------
@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    obj = wire(msg)
    assert obj["v"] == 1 and obj["type"] == type(msg).__struct_config__.tag
    assert p.decode(type(msg), p.encode(msg)) == msg


def test_every_message_class_has_a_round_trip_case():
    classes = {c for c in vars(p).values()
               if isinstance(c, type) and issubclass(c, p._Message) and c not in
               (p._Message, p._Event)}
    assert classes <= {type(m) for m in MESSAGES}


def test_the_type_tag_picks_the_class_and_a_wrong_one_is_refused():
    assert p.decode(p.AnyEvent, p.encode(MESSAGES[-5])) == MESSAGES[-5]
    assert type(p.decode(p.AnyEvent, p.encode(MESSAGES[-4]))) is p.BatchEvent
    bad(p.VerifyRequest, p.encode(RESULT), "Invalid value 'VerifyResult'", "$.type")
    bad(p.AnyEvent, p.encode(CHUNK), "Invalid value 'TokenChunk'")
    # Where one subject carries several classes (a reply, an event), the tag is required.
    untagged = with_fields(CHUNK, type=KeyError)
    with pytest.raises(p.MalformedReply, match="missing required field `type`"):
        p.decode_reply((p.TokenChunk, p.GenerateDone), untagged)


def test_defaults_and_int_accepted_for_float():
    msg = p.decode(p.GenerateRequest, pack({"type": "GenerateRequest", "v": 1,
                                            "max_new_tokens": 4, "prompt_ids": [1]}))
    assert msg == p.GenerateRequest(max_new_tokens=4, prompt_ids=[1])
    assert (msg.mode, msg.sampling, msg.seed) == ("wisp", p.SamplingParams(), None)
    req = p.decode(p.VerifyRequest, with_fields(verify_request(), budget_ms=12, draft_ms=0))
    assert req.budget_ms == 12.0 and type(req.budget_ms) is float
    probs = [[1, 0], [1, 0], [1, 0]]  # ints where probabilities (floats) are expected
    req = p.decode(p.VerifyRequest, with_fields(verify_request(), draft_sparse_probs=probs))
    assert all(type(x) is float for row in req.draft_sparse_probs for x in row)


ids = st.integers(0, 200_000)


@st.composite
def verify_requests(draw):
    k = draw(st.integers(0, p.MAX_DRAFT_TOKENS))
    draft = draw(st.lists(ids, min_size=k, max_size=k))
    sparse_ids = sparse_probs = None
    if draw(st.booleans()):
        m = draw(st.integers(1, 5))
        sparse_ids, sparse_probs = [], []
        for token in draft:  # a valid sparse row: unique ids, the drafted one included
            others = draw(st.lists(ids.filter(lambda t, token=token: t != token),
                                   min_size=m - 1, max_size=m - 1, unique=True))
            sparse_ids.append([token, *others])
            sparse_probs.append([1.0] + [0.0] * (m - 1))
    return p.VerifyRequest(
        sid=draw(st.from_regex(s.SAFE_TOKEN_RE, fullmatch=True)), round=draw(ids),
        base_len=draw(ids), draft_ids=draft,
        budget_ms=draw(st.floats(-1e9, 1e9)),
        draft_ms=draw(st.floats(0.0, 1e6)), device_id=draw(st.from_regex(s.NAME_RE, fullmatch=True)),
        draft_sparse_ids=sparse_ids, draft_sparse_probs=sparse_probs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(verify_requests())
def test_verify_request_round_trip_property(req):
    assert p.decode(p.VerifyRequest, p.encode(req)) == req


# -- bad input: every problem is BAD_REQUEST naming it ------------------------------------------
def test_garbage_and_non_map_payloads():
    bad(p.VerifyRequest, b"\xc1\x00garbage", "not valid msgpack")
    bad(p.VerifyRequest, b"", "empty")
    bad(p.VerifyRequest, pack([1, 2, 3]), "Expected `object`, got `array`")
    bad(p.VerifyRequest, pack("hello"), "Expected `object`, got `str`")
    bad(p.VerifyRequest, p.encode(verify_request()) + b"\x00", "not valid msgpack")
    bad(p.SessionClose, pack({1: 2}), "Expected `str`, got `int`")  # non-str map key
    bad(p.SessionClose, pack({"type": "SessionClose", "v": 1,
                              "sid": msgspec.msgpack.Ext(1, b"x")}), "got `ext`")
    bad(p.SessionClose, b"\x83\xa4type\xacSessionClose\xa1v\x01\xa3sid\xa2\xff\xfe",
        "not valid msgpack")  # bad UTF-8
    with pytest.raises(WispError) as info:
        p.decode(p.SessionClose, "not bytes")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_version_checked():
    close = p.SessionClose(sid=SID)
    bad(p.SessionClose, with_fields(close, v=2), "unsupported protocol version 2")
    bad(p.SessionClose, with_fields(close, v=True), "Expected `int`, got `bool`", "$.v")


def test_missing_and_unknown_fields():
    bad(p.VerifyRequest, with_fields(verify_request(), sid=KeyError),
        "VerifyRequest: Object missing required field `sid`")
    bad(p.VerifyRequest, with_fields(verify_request(), draft_idz=[1]),
        "unknown field `draft_idz`")
    bad(p.SessionClose, with_fields(p.SessionClose(sid=SID), error={}), "unknown field `error`")


@pytest.mark.parametrize("field,value,needle", [
    ("round", True, "Expected `int`, got `bool` - at `$.round`"),
    ("round", "3", "Expected `int`, got `str` - at `$.round`"),
    ("round", 3.0, "Expected `int`, got `float` - at `$.round`"),
    ("base_len", None, "Expected `int`, got `None` - at `$.base_len`"),
    ("draft_ids", [1, True], "Expected `int`, got `bool` - at `$.draft_ids[1]`"),
    ("draft_ids", "abc", "Expected `array`, got `str` - at `$.draft_ids`"),
    ("budget_ms", True, "Expected `float`, got `bool` - at `$.budget_ms`"),
    ("budget_ms", "1.0", "Expected `float`, got `str` - at `$.budget_ms`"),
    ("sid", b"bytes", "Expected `str`, got `bytes` - at `$.sid`"),
    ("sid", 12, "Expected `str`, got `int` - at `$.sid`"),
])
def test_wrong_types(field, value, needle):
    bad(p.VerifyRequest, with_fields(verify_request(), **{field: value}), needle)


@pytest.mark.parametrize("changes,needle", [
    (dict(draft_ids=[5, -1, 2]), "Expected `int` >= 0 - at `$.draft_ids[1]`"),
    (dict(base_len=-4), "Expected `int` >= 0 - at `$.base_len`"),
    (dict(round=-1), "Expected `int` >= 0 - at `$.round`"),
    (dict(draft_sparse_ids=[[5, -3], [9, 4], [2, 3]]), "at `$.draft_sparse_ids[0][1]`"),
    (dict(budget_ms=math.nan), "at `$.budget_ms`"),
    (dict(budget_ms=math.inf), "at `$.budget_ms`"),
    (dict(draft_ms=-1.0), "Expected `float` >= 0.0 - at `$.draft_ms`"),
    (dict(draft_sparse_probs=[[0.75, 1.25], [1.0, 0.0], [0.5, 0.5]]),
     "Expected `float` <= 1.0 - at `$.draft_sparse_probs[0][1]`"),
    (dict(draft_sparse_probs=[[0.75, math.nan], [1.0, 0.0], [0.5, 0.5]]),
     "at `$.draft_sparse_probs[0][1]`"),
    (dict(draft_sparse_probs=[[0.75, -0.0001], [1.0, 0.0], [0.5, 0.5]]),
     "Expected `float` >= 0.0 - at `$.draft_sparse_probs[0][1]`"),
    (dict(draft_features=[[0.9, 0.1, 0.5, 0.01, math.inf, 0.9, 1.0]] * 3),
     "at `$.draft_features[0][4]`"),
    (dict(sid="a.b"), "matching regex '^[A-Za-z0-9_-]{1,128}$' - at `$.sid`"),
    (dict(sid="*"), "at `$.sid`"),
    (dict(sid=""), "at `$.sid`"),
    (dict(device_id="has space"), "at `$.device_id`"),
])
def test_ranges_and_ids(changes, needle):
    bad(p.VerifyRequest, with_fields(verify_request(), **changes), needle)


def test_draft_and_sparse_sizes():
    k = p.MAX_DRAFT_TOKENS + 1
    bad(p.VerifyRequest, with_fields(verify_request(), draft_ids=[1] * k, draft_sparse_ids=None,
                                     draft_sparse_probs=None, draft_features=None),
        f"Expected `array` of length <= {p.MAX_DRAFT_TOKENS} - at `$.draft_ids`")
    m = p.MAX_SPARSE_M + 1
    one = verify_request(draft_ids=[1], draft_sparse_ids=[[1]], draft_sparse_probs=[[1.0]],
                         draft_features=None)
    bad(p.VerifyRequest, with_fields(one, draft_sparse_ids=[list(range(1, m + 1))],
                                     draft_sparse_probs=[[1.0] + [0.0] * (m - 1)]),
        f"length <= {p.MAX_SPARSE_M} - at `$.draft_sparse_ids[0]`")
    bad(p.VerifyRequest, with_fields(verify_request(), draft_sparse_ids=[[5], [], [2]],
                                     draft_sparse_probs=[[1.0], [], [1.0]]),
        "length >= 1 - at `$.draft_sparse_ids[1]`")
    bad(p.VerifyRequest, with_fields(verify_request(), draft_features=[[1.0] * 4] * 3),
        "at `$.draft_features[0]`")


@pytest.mark.parametrize("changes,needle", [
    (dict(draft_sparse_probs=None), "must both be given or both be absent"),
    (dict(draft_sparse_ids=KeyError), "must both be given or both be absent"),
    (dict(draft_sparse_ids=[[5], [9]], draft_sparse_probs=[[1.0], [1.0]]),
     "draft_sparse_ids has 2 rows; it needs one per drafted token (3)"),
    (dict(draft_sparse_probs=[[0.75], [1.0, 0.0], [0.5, 0.5]]),
     "row 0: every sparse row needs the same number"),
    (dict(draft_sparse_ids=[[5, 1], [9], [2]], draft_sparse_probs=[[0.75, 0.25], [1.0], [1.0]]),
     "row 1: every sparse row needs the same number"),
    (dict(draft_sparse_probs=[[0.75, 0.2], [1.0, 0.0], [0.5, 0.5]]),
     "row 0: draft_sparse_probs sums to 0.95, not 1"),
    (dict(draft_sparse_probs=[[0.75, 0.25], [0.9, 0.3], [0.5, 0.5]]), "row 1: draft_sparse_probs"),
    (dict(draft_sparse_ids=[[5, 5], [9, 4], [2, 3]]), "row 0: draft_sparse_ids holds duplicate"),
    (dict(draft_sparse_ids=[[6, 1], [9, 4], [2, 3]]),
     "row 0: drafted token 5 is not in its sparse distribution with probability > 0"),
    (dict(draft_sparse_probs=[[0.75, 0.25], [0.0, 1.0], [0.5, 0.5]]),
     "row 1: drafted token 9 is not in its sparse distribution with probability > 0"),
    (dict(draft_features=[[0.1] * 7] * 2), "draft_features has 2 rows; it needs one per"),
])
def test_sparse_draft_distributions_are_checked_once_here(changes, needle):
    bad(p.VerifyRequest, with_fields(verify_request(), **changes), needle)


def test_oversized_payload_refused_before_unpacking():
    data = b"\x91" + b"\x00" * p.MAX_PAYLOAD_BYTES  # valid-looking prefix, too long
    bad(p.VerifyRequest, data, f"the limit is {p.MAX_PAYLOAD_BYTES}")
    row = list(range(64))
    big = verify_request(draft_ids=[0] * 64, draft_sparse_ids=[row] * 64,
                         draft_sparse_probs=[[1.0] + [0.0] * 63] * 64, draft_features=None)
    huge = p.VerifierBatch(batch_id="b", items=[p.BatchEntry(request=big, reply_to="_INBOX.x")]
                           * 200)
    with pytest.raises(WispError, match="exceed the payload limit") as info:
        p.encode(huge)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_generate_request_rules():
    base = {"type": "GenerateRequest", "v": 1, "max_new_tokens": 4}
    bad(p.GenerateRequest, pack(base | {"prompt": "hi", "prompt_ids": [1]}),
        "give exactly one of prompt (text) and prompt_ids, not both")
    bad(p.GenerateRequest, pack(base), "got neither")
    ok = base | {"prompt": "hi"}
    bad(p.GenerateRequest, pack(ok | {"mode": "turbo"}), "Invalid enum value 'turbo'", "$.mode")
    bad(p.GenerateRequest, pack(ok | {"max_new_tokens": 0}), ">= 1 - at `$.max_new_tokens`")
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "draft_top_m": 8}
    for change, where in [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                          ({"draft_top_m": 0}, "draft_top_m"),
                          ({"temperature": math.inf}, "temperature")]:
        bad(p.GenerateRequest, pack(ok | {"sampling": sampling | change}),
            f"at `$.sampling.{where}`")
    bad(p.GenerateRequest, pack(ok | {"k_max": p.MAX_DRAFT_TOKENS + 1}), "at `$.k_max`")
    bad(p.GenerateRequest, pack(ok | {"prompt": ""}), "length >= 1 - at `$.prompt`")
    bad(p.GenerateRequest, pack(ok | {"prompt": "é" * (p.MAX_PROMPT_BYTES // 2 + 1)}),
        f"prompt is over {p.MAX_PROMPT_BYTES} bytes")
    bad(p.GenerateRequest, pack(base | {"prompt_ids": [0] * (p.MAX_PROMPT_IDS + 1)}),
        f"length <= {p.MAX_PROMPT_IDS} - at `$.prompt_ids`")
    bad(p.GenerateRequest, pack(ok | {"slo": {"ttft_ms": 100}}),
        "missing required field `tpot_ms` - at `$.slo`")
    bad(p.GenerateRequest, pack(ok | {"slo": [100, 50]}), "at `$.slo`")


def test_degenerate_sampling_values_pass_the_boundary():
    """Values at the edges of the ranges are served (common.sampling handles their limits),
    not refused: the wire refuses only what is out of range."""
    for params in (dict(temperature=1e-300), dict(temperature=1e300), dict(top_p=1e-300),
                   dict(top_k=10**9), dict(draft_top_m=1)):
        req = p.GenerateRequest(max_new_tokens=1, prompt="x",
                                sampling=p.SamplingParams(**params))
        assert p.decode(p.GenerateRequest, p.encode(req)) == req


def test_nested_errors_name_the_path():
    batch = wire(BATCH)
    batch["items"][1]["request"]["draft_ids"][0] = -7
    bad(p.VerifierBatch, pack(batch), "at `$.items[1].request.draft_ids[0]`")
    batch = wire(BATCH)
    batch["items"][0]["reply_to"] = "_INBOX.*"
    bad(p.VerifierBatch, pack(batch), "at `$.items[0].reply_to`")
    batch["items"] = []
    bad(p.VerifierBatch, pack(batch), "length >= 1 - at `$.items`")
    batch = wire(BATCH)
    batch["items"][0]["request"]["draft_sparse_probs"][2] = [0.5, 0.4]
    bad(p.VerifierBatch, pack(batch), "row 2: draft_sparse_probs sums to", "$.items[0].request")


def test_cross_field_rules_of_replies_and_events():
    bad(p.VerifyResult, with_fields(RESULT, num_accepted=4), "num_accepted (4) exceeds")
    bad(p.Heartbeat, with_fields(HEARTBEAT, free_blocks=65), "free_blocks (65) exceeds")
    bad(p.PredictorUpdated, with_fields(PREDICTOR, sha256="XYZ"), "at `$.sha256`")
    round_event = next(m for m in MESSAGES if isinstance(m, p.RoundEvent))
    bad(p.AnyEvent, with_fields(round_event, accepted=5), "accepted (5) exceeds drafted (4)")
    bad(p.AnyEvent, with_fields(round_event, mode="turbo"), "at `$.mode`")
    refusal = next(m for m in MESSAGES if isinstance(m, p.RefusalEvent))
    bad(p.AnyEvent, with_fields(refusal, mode="turbo"), "at `$.mode`")
    bad(p.AnyEvent, with_fields(refusal, code="no spaces"), "at `$.code`")
    bad(p.AnyEvent, with_fields(refusal, retry_after_ms=-1.0), "at `$.retry_after_ms`")


def test_fuzzed_bytes_only_ever_raise_bad_request():
    rng = random.Random(7)
    valid = p.encode(verify_request())
    for _ in range(500):
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
                                        "draft_sparse_probs", "draft_features", "type", "v",
                                        "typo"]), wire_values),
       st.data())
def test_fuzzed_maps_only_ever_raise_bad_request(changes, data):
    obj = wire(verify_request()) | changes
    cls = data.draw(st.sampled_from([p.VerifyRequest, p.VerifierBatch, p.GenerateRequest,
                                     p.AnyEvent]))
    try:
        msg = p.decode(cls, pack(obj))
    except WispError as err:
        assert err.code is ErrorCode.BAD_REQUEST
    else:
        assert p.decode(cls, p.encode(msg)) == msg


# -- building and checking at the sender ---------------------------------------------------------
def test_cross_field_rules_run_when_a_message_is_built():
    with pytest.raises(ValueError, match="not both"):
        p.GenerateRequest(max_new_tokens=1, prompt="x", prompt_ids=[1])
    with pytest.raises(ValueError, match="row 0"):
        verify_request(draft_sparse_probs=[[0.5, 0.4], [1.0, 0.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="top_p"):
        p.SamplingParams(top_p=0.0)


def test_checked_applies_the_receivers_field_constraints():
    with pytest.raises(WispError, match=r"at `\$.draft_ids\[0\]`") as info:
        p.checked(verify_request(draft_ids=[-1, 9, 2], draft_sparse_ids=None,
                                 draft_sparse_probs=None))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert p.checked(RESULT) == RESULT


# -- replies --------------------------------------------------------------------------------------
def test_decode_reply_raises_the_carried_error():
    data = p.error_reply(WispError(ErrorCode.DRAFT_TOO_LONG, "k=20 > k_max=16"))
    assert msgspec.msgpack.decode(data) == {
        "type": "ErrorReply", "v": 1,
        "error": {"code": "draft_too_long", "message": "k=20 > k_max=16"}}
    with pytest.raises(WispError) as info:
        p.decode_reply(p.VerifyResult, data)
    assert info.value.code is ErrorCode.DRAFT_TOO_LONG
    assert info.value.message == "k=20 > k_max=16"
    assert p.decode_reply(p.VerifyResult, p.encode(RESULT)) == RESULT


def test_decode_reply_unknown_code_and_garbage():
    with pytest.raises(WispError) as info:
        p.decode_reply(p.SessionOpened, p.encode(p.ErrorReply(
            error=p.ErrorInfo(code="from_the_future", message="m"))))
    assert info.value.code is ErrorCode.INTERNAL and "from_the_future" in info.value.message
    with pytest.raises(p.MalformedReply) as info:
        p.decode_reply(p.SessionOpened, b"\xc1")
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_decode_reply_picks_among_stream_messages():
    kinds = (p.TokenChunk, p.GenerateDone)
    assert p.decode_reply(kinds, p.encode(CHUNK)) == CHUNK
    assert p.decode_reply(kinds, p.encode(DONE)) == DONE
    with pytest.raises(p.MalformedReply, match="missing required field `text`"):
        p.decode_reply(kinds, with_fields(CHUNK, text=KeyError))
    with pytest.raises(WispError) as info:
        p.decode_reply(kinds, p.error_reply(WispError(ErrorCode.UNKNOWN_SESSION, "gone")))
    assert info.value.code is ErrorCode.UNKNOWN_SESSION and \
        not isinstance(info.value, p.MalformedReply)


def test_error_reply_truncates_long_messages():
    data = p.error_reply(WispError(ErrorCode.INTERNAL, "x" * 10_000))
    message = msgspec.msgpack.decode(data)["error"]["message"]
    assert len(message) == p.MAX_ERROR_MESSAGE_CHARS and message.endswith("...")


def test_error_replies_carry_retry_after_ms():
    err = WispError(ErrorCode.OVERLOADED, "x" * 10_000, retry_after_ms=1500.0)
    data = p.error_reply(err)
    assert msgspec.msgpack.decode(data)["error"]["retry_after_ms"] == 1500.0
    with pytest.raises(WispError) as info:
        p.decode_reply(p.SessionOpened, data)
    assert info.value.code is ErrorCode.OVERLOADED and info.value.retry_after_ms == 1500.0
    assert len(info.value.message) == p.MAX_ERROR_MESSAGE_CHARS  # cut, hint kept
    assert "(retry after 1500 ms)" in str(info.value)
    # In a GenerateDone too, and from a code this build does not know.
    info_ = p.ErrorInfo(code="from_the_future", message="m", retry_after_ms=7.0)
    assert p.decode(p.GenerateDone, p.encode(p.GenerateDone(
        sid=SID, finish_reason="error", num_tokens=0, timings=DONE.timings,
        stats=p.GenerateStats(), error=info_))).error == info_
    assert info_.to_error().code is ErrorCode.INTERNAL and info_.to_error().retry_after_ms == 7.0


def test_retry_after_ms_is_left_off_the_wire_when_absent_and_checked_when_present():
    # Absent, an error reply is byte for byte what peers built before the field read.
    assert "retry_after_ms" not in msgspec.msgpack.decode(
        p.error_reply(WispError(ErrorCode.CAPACITY, "full")))["error"]
    assert WispError(ErrorCode.CAPACITY, "full").retry_after_ms is None
    negative = with_fields(p.ErrorReply(error=p.ErrorInfo(code="overloaded", message="m")),
                           error={"code": "overloaded", "message": "m", "retry_after_ms": -1.0})
    with pytest.raises(p.MalformedReply, match=r"at `\$.error.retry_after_ms`"):
        p.decode_reply(p.SessionOpened, negative)


def test_new_sid_is_128_bit_and_safe():
    sid = p.new_sid()
    assert len(sid) == 32 and s.is_safe_token(sid) and sid != p.new_sid()


# -- subjects and keys ----------------------------------------------------------------------------
def test_subjects_and_keys():
    assert s.GENERATE_EDGE == "wisp.edge.generate"
    assert s.verifier_batch("verifier-0") == "wisp.verifier.verifier-0.batch"
    assert s.verifier_done("verifier-0") == "wisp.verifier.verifier-0.done"
    assert s.event("round") == "wisp.events.round"
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
