"""Wire protocol: one msgspec struct per NATS message, one msgpack codec (docs/architecture.md).

Every payload is a msgpack map carrying a type tag ``"type"`` (the class name) and the protocol
version ``"v": 1``, then snake_case fields; nested objects (SLO, sampling, timings, batch
entries) are maps too. :func:`encode` and :func:`decode` are the only way in and out:

* decoding never unpickles or evaluates anything: msgspec's typed msgpack decoder after a size
  check; the type tag says which class a payload is (a reply may be one of several);
* every field is checked against its type (``bool`` is not an ``int``, an ``int`` is accepted
  where a ``float`` is expected, numbers are finite) and its constraints (``Meta`` ranges,
  lengths, patterns); unknown fields are refused so a typo is loud; cross-field rules live in
  each struct's ``__post_init__`` (which also runs when a message is built in Python);
* every problem becomes ``WispError(ErrorCode.BAD_REQUEST, ...)`` naming the class and the
  field (``VerifyRequest: Expected `int` >= 0 - at `$.draft_ids[3]```).

This is the boundary: what passes :func:`decode` is structurally sound, and the only checks left
for a service are those that need its model (token ids within the vocabulary, lengths within
the context, ``k_max``; see :mod:`common.limits`). Cores trust what they are given.

The module imports neither torch nor the cores (the SDK uses it).
"""

from __future__ import annotations

import math
import secrets
from typing import Annotated, Any, Literal, TypeVar, get_args

import msgspec
from msgspec import Meta

from common.errors import ErrorCode, WispError
from common.subjects import NAME_RE, SAFE_TOKEN_RE

__all__ = [
    "DRAFT_FEATURES",
    "MAX_BATCH_ENTRIES",
    "MAX_DRAFT_TOKENS",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_PAYLOAD_BYTES",
    "MAX_PROMPT_BYTES",
    "MAX_PROMPT_IDS",
    "MAX_SPARSE_M",
    "MODES",
    "PROB_SUM_TOL",
    "PROTOCOL_VERSION",
    "AdmissionEvent",
    "AnyEvent",
    "BatchDone",
    "BatchEntry",
    "BatchEvent",
    "ErrorEvent",
    "EstimatorCoefficients",
    "ErrorInfo",
    "ErrorReply",
    "GenerateDone",
    "GenerateRequest",
    "GenerateStats",
    "GenerateTimings",
    "Heartbeat",
    "MalformedReply",
    "ModelLimits",
    "PredictorUpdated",
    "RefusalEvent",
    "RequestEvent",
    "RoundEvent",
    "ScheduleEvent",
    "SamplingParams",
    "SessionClose",
    "SessionClosed",
    "SessionLength",
    "SessionOpen",
    "SessionOpened",
    "SessionSpec",
    "Slo",
    "TokenChunk",
    "VerdictEvent",
    "VerifierBatch",
    "VerifyRequest",
    "VerifyResult",
    "VocabInfo",
    "checked",
    "decode",
    "decode_reply",
    "encode",
    "error_reply",
    "new_sid",
]

PROTOCOL_VERSION = 1

# Wire-level bounds: what a peer can make a service allocate, checked before anything else.
# NATS must allow payloads this large (nats-server's default max_payload is 1 MiB).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_PROMPT_IDS = 32_768
# A text prompt, in UTF-8 bytes: bounds the edge's tokenizer work before any model limit
# applies (an edge bounds it further by what its model could ever take; see common.limits).
MAX_PROMPT_BYTES = 1_048_576
MAX_DRAFT_TOKENS = 64  # per round; each deployment's (smaller) k_max is agreed at open
MAX_SPARSE_M = 64  # entries of one position's sparse draft distribution
MAX_BATCH_ENTRIES = 1024  # requests in one VerifierBatch
MAX_ERROR_MESSAGE_CHARS = 2000  # error replies are cut to this
# Probability rows cross the wire as float32 rounded to msgpack floats; 1e-3 is far looser
# than that rounding yet still catches logits, log-probs or unnormalised weights.
PROB_SUM_TOL = 1e-3
# Columns of a drafted token's feature row (VerifyRequest.draft_features), in this order: what
# the edge's draft-length policy saw, carried to the verifier's verdict events so that the
# rejection predictor learns from live traffic (common.engine.features computes them): four of
# the draft distribution at this token, its position in the draft, the product of the draft's
# confidences so far (this token included) and the session's acceptance rate in its last round.
DRAFT_FEATURES = ("confidence", "entropy", "margin", "std", "position", "cum_confidence",
                  "prev_accept_rate")

_FLOAT_MAX = 1e300  # |x| beyond this is treated as not finite (msgspec has no isfinite)

# -- field types --------------------------------------------------------------------------------
Id = Annotated[str, Meta(pattern=f"^{SAFE_TOKEN_RE.pattern}$")]  # 1-128 of A-Z a-z 0-9 _ -
Name = Annotated[str, Meta(pattern=f"^{NAME_RE.pattern}$")]  # ... and . / @ +
Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
# A subject one may publish to: dot-separated non-empty tokens, no whitespace, no wildcards.
Inbox = Annotated[str, Meta(pattern=r"^[^\s.*>]+(\.[^\s.*>]+)*$", max_length=512)]
Count = Annotated[int, Meta(ge=0)]  # counts, indices, lengths, rounds, token ids
TokenId = Count
Positive = Annotated[int, Meta(ge=1)]
Seed = Annotated[int, Meta(ge=0)]  # msgpack carries up to 2**64 - 1
KMax = Annotated[int, Meta(ge=1, le=MAX_DRAFT_TOKENS)]
Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
Ms = Annotated[float, Meta(ge=0.0, le=_FLOAT_MAX)]  # a duration in milliseconds
PositiveMs = Annotated[float, Meta(gt=0.0, le=_FLOAT_MAX)]
Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
PromptIds = Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_IDS)]
DraftIds = Annotated[list[TokenId], Meta(max_length=MAX_DRAFT_TOKENS)]
SparseIds = Annotated[list[Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_SPARSE_M)]],
                      Meta(max_length=MAX_DRAFT_TOKENS)]  # [k][m]
SparseProbs = Annotated[list[Annotated[list[Prob], Meta(min_length=1, max_length=MAX_SPARSE_M)]],
                        Meta(max_length=MAX_DRAFT_TOKENS)]  # [k][m]
FeatureRows = Annotated[list[Annotated[list[Finite], Meta(min_length=len(DRAFT_FEATURES),
                                                          max_length=len(DRAFT_FEATURES))]],
                        Meta(max_length=MAX_DRAFT_TOKENS)]  # [k][F]
Mode = Literal["wisp", "sled", "ucb", "centralized", "colocated"]
FinishReason = Literal["eos", "length", "error"]
MODES: tuple[str, ...] = get_args(Mode)
SERVER_MODES: tuple[str, ...] = ("centralized", "colocated")  # served on wisp.server.generate


def new_sid() -> str:
    """A random 128-bit session id, safe in subjects and keys."""
    return secrets.token_hex(16)


class _Obj(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A nested object: a msgpack map with exactly these fields."""


class _Message(_Obj, tag_field="type", tag=True, kw_only=True):
    """A top-level payload: tagged with its class name, versioned."""

    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {self.v!r}; this service speaks "
                             f"{PROTOCOL_VERSION}")


# -- values shared by several messages ----------------------------------------------------------
class Slo(_Obj, frozen=True, kw_only=True):
    ttft_ms: PositiveMs
    tpot_ms: PositiveMs


class SamplingParams(_Obj, frozen=True, kw_only=True):
    """Decoding parameters shared by the draft (temperature, draft_top_m) and the target.

    Every value in range works exactly (common.sampling handles the limits: a vanishing
    temperature or top_p is the argmax, a huge temperature the uniform distribution)."""

    temperature: Annotated[float, Meta(ge=0.0, le=_FLOAT_MAX)] = 0.0  # 0 => greedy
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0  # 1 => off
    top_k: Count = 0  # 0 => off
    draft_top_m: Annotated[int, Meta(ge=1, le=MAX_SPARSE_M)] = 8

    def __post_init__(self) -> None:
        # Structs built in Python skip Meta checks; these are the same rules.
        t, p = self.temperature, self.top_p
        if not _is_number(t) or not 0.0 <= t <= _FLOAT_MAX:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_number(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_int(self.draft_top_m) or not 1 <= self.draft_top_m <= MAX_SPARSE_M:
            raise ValueError(f"draft_top_m must be an integer in [1, {MAX_SPARSE_M}], got "
                             f"{self.draft_top_m!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _at_most(part: int, whole: int, part_name: str, whole_name: str) -> None:
    if part > whole:
        raise ValueError(f"{part_name} ({part}) exceeds {whole_name} ({whole})")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class VocabInfo(_Obj, frozen=True, kw_only=True):
    """A model's vocabulary as peers compare it: size and a digest of the token table
    (common.models.vocab.vocab_info)."""

    size: Positive
    digest: Annotated[str, Meta(pattern="^[0-9a-f]{16}$")]


class ModelLimits(_Obj, frozen=True, kw_only=True):
    """What a verifier can take, advertised in its heartbeat and checked at session open."""

    vocab: VocabInfo
    k_max: KMax
    max_context: Positive  # prompt + output + k_max must fit
    max_prompt_tokens: Positive


class SessionSpec(_Obj, frozen=True, kw_only=True):
    """What a session is, fixed for its life: the same value at the edge, on the wire, in
    Redis and in both cores."""

    sid: Id
    mode: Mode
    max_new_tokens: Positive
    sampling: SamplingParams = SamplingParams()
    seed: Seed | None = None  # None: each process draws its own generator seed
    k_max: KMax = 8
    slo: Slo | None = None
    device_id: Name = "unknown"


class GenerateTimings(_Obj, kw_only=True):
    ttft_ms: Ms
    tpot_ms: Ms
    e2e_ms: Ms


class GenerateStats(_Obj, kw_only=True):
    rounds: Count = 0
    drafted: Count = 0
    accepted: Count = 0
    wasted_draft_ms: Ms = 0.0  # drafting time of the tokens the target rejected (WDT)

    def __post_init__(self) -> None:
        _at_most(self.accepted, self.drafted, "accepted", "drafted")


class ErrorInfo(_Obj, kw_only=True, omit_defaults=True):
    """An error as it crosses the wire. ``retry_after_ms`` (overloaded): when the sender
    expects capacity to free; left off the wire when None, so that peers built before it
    existed still read every other error."""

    code: Name  # an ErrorCode value; a code this build does not know reads as INTERNAL
    message: str
    retry_after_ms: Ms | None = None

    @classmethod
    def of(cls, err: WispError) -> ErrorInfo:
        message = err.message
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[:MAX_ERROR_MESSAGE_CHARS - 3] + "..."
        return cls(code=err.code, message=message, retry_after_ms=err.retry_after_ms)

    def to_error(self) -> WispError:
        code, message = self.code, self.message
        if code not in ErrorCode.__members__.values():
            # A code from a newer peer: keep its words rather than calling the reply malformed.
            return WispError(ErrorCode.INTERNAL, f"peer error {code!r}: {message}",
                             retry_after_ms=self.retry_after_ms)
        return WispError(ErrorCode(code), message, retry_after_ms=self.retry_after_ms)


# -- SDK <-> edge-drafter / admission-scheduler --------------------------------------------------
class GenerateRequest(_Message, kw_only=True):
    """Start a generation: give exactly one of ``prompt`` (text) or ``prompt_ids``."""

    max_new_tokens: Positive
    mode: Mode = "wisp"
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_BYTES)] | None = None
    prompt_ids: PromptIds | None = None
    slo: Slo | None = None
    sampling: SamplingParams = SamplingParams()
    seed: Seed | None = None
    k_max: KMax | None = None  # None: the edge's default
    policy: Name | None = None  # draft-length policy; None: the mode's default
    device_profile: Name | None = None
    # Continue a session whose edge-drafter went away: its committed tokens and parameters
    # come from Redis; the stream restarts at output index 0 (the client skips what it has).
    resume_sid: Id | None = None

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        if self.resume_sid is not None and self.prompt is None and self.prompt_ids is None:
            return
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) and prompt_ids, "
                             + ("not both" if self.prompt is not None else "got neither"))
        if self.prompt is not None and len(self.prompt.encode()) > MAX_PROMPT_BYTES:
            raise ValueError(f"prompt is over {MAX_PROMPT_BYTES} bytes of UTF-8")


class TokenChunk(_Message, kw_only=True):
    """Streamed to the request's reply inbox; ``index`` is that of token_ids[0] in the output."""

    sid: Id
    index: Count
    token_ids: list[TokenId]
    text: str


class GenerateDone(_Message, kw_only=True):
    """Last message of a stream. ``error`` only with finish_reason "error"."""

    sid: Id
    finish_reason: FinishReason
    num_tokens: Count
    timings: GenerateTimings
    stats: GenerateStats
    error: ErrorInfo | None = None

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        if self.error is not None and self.finish_reason != "error":
            raise ValueError(f"error is set but finish_reason is {self.finish_reason!r}")


# -- edge-drafter <-> admission-scheduler --------------------------------------------------------
class SessionOpen(_Message, kw_only=True):
    """Register a session. ``vocab`` is the opener's vocabulary (its draft model, or the
    server's tokenizer): a verifier with another vocabulary is never chosen."""

    spec: SessionSpec
    prompt_ids: PromptIds
    vocab: VocabInfo


class SessionOpened(_Message, kw_only=True):
    sid: Id
    verifier_id: Id
    committed_len: Count


class SessionClose(_Message, kw_only=True):
    sid: Id


class SessionClosed(_Message, kw_only=True):
    sid: Id


class VerifyRequest(_Message, kw_only=True):
    """One round of one session. ``budget_ms``: how long the edge can still wait for the
    result (docs/architecture.md, "Deadlines"); it may be negative when the round is late.

    When sampling, each drafted position carries the draft's sparse top-m distribution; it is
    checked here once (one row per drafted token, ids unique per row, probabilities summing to
    1, the drafted token among its row's ids with probability > 0) and trusted downstream.
    ``draft_features`` [k][F] (columns DRAFT_FEATURES) are what the draft policy saw."""

    sid: Id
    round: Count
    base_len: Count
    draft_ids: DraftIds  # [k]
    budget_ms: Finite
    draft_ms: Ms
    device_id: Name
    draft_sparse_ids: SparseIds | None = None  # [k][m], sampling only
    draft_sparse_probs: SparseProbs | None = None  # [k][m], sampling only
    draft_features: FeatureRows | None = None  # [k][F]
    # Which policy drafted the round, and with which predictor; `censored`: a rule reading the
    # features ended the round, so its (features, label) rows are no fair sample to learn from
    # (the token it stopped at was never verified). Carried into the VerdictEvent.
    policy: Name | None = None
    predictor_version: Name | None = None
    censored: bool = False
    # The edge's measured round trip of its previous round (submit to verdict): with the
    # scheduler's own residence time for that round it gives the device's network time, from
    # which the scheduler takes its downlink estimate (DESIGN.md §6).
    prev_rtt_ms: Ms | None = None

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        k = len(self.draft_ids)
        if self.draft_features is not None and len(self.draft_features) != k:
            raise ValueError(f"draft_features has {len(self.draft_features)} rows; it needs "
                             f"one per drafted token ({k})")
        ids, probs = self.draft_sparse_ids, self.draft_sparse_probs
        if (ids is None) != (probs is None):
            raise ValueError("draft_sparse_ids and draft_sparse_probs must both be given or "
                             "both be absent")
        if ids is None or probs is None:
            return
        for name, rows in (("draft_sparse_ids", ids), ("draft_sparse_probs", probs)):
            if len(rows) != k:
                raise ValueError(f"{name} has {len(rows)} rows; it needs one per drafted "
                                 f"token ({k})")
        width = len(ids[0]) if k else 0
        for i, (token, row_ids, row_probs) in enumerate(zip(self.draft_ids, ids, probs,
                                                            strict=True)):
            if len(row_ids) != width or len(row_probs) != width:
                raise ValueError(f"row {i}: every sparse row needs the same number of ids and "
                                 f"probabilities ({width}); got {len(row_ids)} and "
                                 f"{len(row_probs)}")
            if len(set(row_ids)) != width:
                raise ValueError(f"row {i}: draft_sparse_ids holds duplicate ids")
            if abs(math.fsum(row_probs) - 1.0) > PROB_SUM_TOL:
                raise ValueError(f"row {i}: draft_sparse_probs sums to "
                                 f"{math.fsum(row_probs):.6g}, not 1 (+-{PROB_SUM_TOL})")
            if token not in row_ids or row_probs[row_ids.index(token)] <= 0.0:
                raise ValueError(f"row {i}: drafted token {token} is not in its sparse "
                                 "distribution with probability > 0")


class VerifyResult(_Message, kw_only=True):
    """The verdict on one round; what Redis stores as the round's answer for retries."""

    sid: Id
    round: Count
    num_drafted: Count
    num_accepted: Count
    new_tokens: Annotated[list[TokenId], Meta(max_length=MAX_DRAFT_TOKENS + 1)]
    committed_len: Count
    finished: bool
    queue_ms: Ms = 0.0
    batch_ms: Ms = 0.0
    batch_size: Count = 0

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        _at_most(self.num_accepted, self.num_drafted, "num_accepted", "num_drafted")


# -- admission-scheduler <-> gpu-verifier --------------------------------------------------------
class BatchEntry(_Obj, kw_only=True):
    request: VerifyRequest
    reply_to: Inbox  # the edge's reply inbox: the verifier answers there directly


class VerifierBatch(_Message, kw_only=True):
    batch_id: Id
    items: Annotated[list[BatchEntry], Meta(min_length=1, max_length=MAX_BATCH_ENTRIES)]


class SessionLength(_Obj, kw_only=True):
    """A session as a verifier holds it after a batch: committed tokens, and how many of them
    have KV in its cache (less after an eviction; 0 once freed)."""

    sid: Id
    committed_len: Count
    cached_len: Count


class BatchDone(_Message, kw_only=True):
    """Sent when a batch's forward pass ends (before its commits and replies): estimator
    feedback with the batch's shape, the verifier is ready for more, and where each session
    of the batch now stands."""

    verifier_id: Id
    batch_id: Id
    batch_ms: Ms  # the forward (core call) alone
    size: Count
    num_linear: Count  # new tokens fed
    num_interactions: Count  # sum of new x (cached + new)
    num_cached: Count  # sum of cached tokens read
    sessions: list[SessionLength] = []


class EstimatorCoefficients(_Obj, frozen=True, kw_only=True):
    """T̂ = a·N_linear + b_compute·N_interactions + b_read·N_cached + c (ms), DESIGN.md §6."""

    a: Ms
    b_compute: Ms
    b_read: Ms
    c: Ms
    source: Name = "calibrated"  # calibrated (profiled on this hardware) | file | redis


class Heartbeat(_Message, kw_only=True):
    verifier_id: Id
    model: Name
    hardware: Name
    free_blocks: Count
    total_blocks: Count
    block_size: Positive
    num_sessions: Count
    limits: ModelLimits
    ts_ms: Finite
    estimator: EstimatorCoefficients | None = None  # its own, loaded at start

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        _at_most(self.free_blocks, self.total_blocks, "free_blocks", "total_blocks")


# -- events (wisp.events.{kind}) -----------------------------------------------------------------
class _Event(_Message, kw_only=True):
    ts_ms: Finite  # sender's wall clock


class RequestEvent(_Event, tag="request", kw_only=True):
    """A generation ended (edge-drafter, or the scheduler for server-side modes)."""

    sid: Id
    mode: Mode
    num_tokens: Count
    timings: GenerateTimings
    slo: Slo | None
    stats: GenerateStats
    finish_reason: FinishReason


class RoundEvent(_Event, tag="round", kw_only=True):
    """One round as the edge saw it."""

    sid: Id
    mode: Mode
    round: Count
    drafted: Count
    accepted: Count
    committed: Count  # tokens the round added (accepted drafts + the target's, cut at the end)
    draft_ms: Ms
    wasted_draft_ms: Ms  # drafting time of the rejected tokens (WDT)
    rtt_ms: Ms
    budget_ms: Finite
    batch_size: Count
    policy: Name | None = None  # the draft-length policy's spec (None: the session drafts not)
    predictor_version: Name | None = None  # the rejection predictor the round's policy used

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        _at_most(self.accepted, self.drafted, "accepted", "drafted")


class VerdictEvent(_Event, tag="verdict", kw_only=True):
    """One verified round as the verifier saw it: the features of each drafted token (what the
    edge's policy read) with the verdict, the predictor's training data from live traffic."""

    sid: Id
    round: Count
    device_id: Name
    greedy: bool
    num_drafted: Count
    num_accepted: Count
    draft_features: FeatureRows | None  # [k][F], None when the edge sent none
    policy: Name | None = None  # as in the VerifyRequest
    predictor_version: Name | None = None
    censored: bool = False  # a feature-reading rule cut the round: not a training sample

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        _at_most(self.num_accepted, self.num_drafted, "num_accepted", "num_drafted")
        if self.draft_features is not None and len(self.draft_features) != self.num_drafted:
            raise ValueError(f"draft_features has {len(self.draft_features)} rows for "
                             f"{self.num_drafted} drafted tokens")


class BatchEvent(_Event, tag="batch", kw_only=True):
    verifier_id: Id
    batch_id: Id
    size: Count
    batch_ms: Ms
    num_linear: Count
    num_interactions: Count
    num_cached: Count
    queue_depth: Count  # batches received and not yet started


class ErrorEvent(_Event, tag="error", kw_only=True):
    service: Name
    code: Name  # an ErrorCode value
    sid: Id | None = None


class ScheduleEvent(_Event, tag="schedule", kw_only=True):
    """One batch as the scheduler saw it: the estimator's time for it when it was formed next
    to the verifier's measured forward, and how many of its requests met their deadlines."""

    verifier_id: Id
    batch_id: Id
    policy: Name
    size: Count
    predicted_ms: Ms  # T̂ of the batch when it was formed (0: no estimator yet)
    observed_ms: Ms  # BatchDone.batch_ms
    guard_ms: Ms  # δ in force
    decision_ms: Ms  # the policy's select() time
    deadlines_met: Count  # done before its deadline (the forward's end, on the scheduler clock)
    deadlines_missed: Count
    late_dispatched: Count  # already past its latest start time when dispatched


class AdmissionEvent(_Event, tag="admission", kw_only=True):
    """A session open as admission control decided it."""

    sid: Id
    outcome: Literal["admitted", "queued", "refused"]
    verifier_id: Id | None = None
    predicted_round_ms: Ms = 0.0  # predicted server time of one round with this session in
    budget_ms: Ms = 0.0  # the tightest per-round server budget it had to fit (0: no SLO)
    retry_after_ms: Ms = 0.0


class RefusalEvent(_Event, tag="refusal", kw_only=True):
    """A generation refused before its first round, as its client was told: sent where the
    request is served (common.transport.generation, in the edge-drafter, or in the scheduler
    for server-side modes) whoever decided it: the edge (a prompt over its model's limits, an
    unknown device profile or policy), the scheduler at open (the verifiers' limits,
    ``overloaded``; it also sends its own ``error`` and ``admission`` events) or a resume of
    an unknown session. The metrics service counts refusals from these alone."""

    code: Name  # an ErrorCode value
    mode: Mode | None = None  # None: unknown (a resume, or a request that did not decode)
    sid: Id | None = None  # the session id it would have had (a resume: the resumed one)
    retry_after_ms: Ms | None = None  # as in the error reply (overloaded)


AnyEvent = (RequestEvent | RoundEvent | VerdictEvent | BatchEvent | ErrorEvent | ScheduleEvent
            | AdmissionEvent | RefusalEvent)


class PredictorUpdated(_Message, kw_only=True):
    """A rejection predictor accepted by the predictor service, in the object store."""

    version: Count  # the announcement's sequence number: higher is newer
    object_name: Annotated[str, Meta(min_length=1, max_length=256)]
    sha256: Sha256  # of the ONNX bytes stored under object_name
    model_version: Name | None = None  # the model's own version (its ONNX metadata)
    threshold: Prob | None = None  # its operating threshold


class ErrorReply(_Message, kw_only=True):
    error: ErrorInfo

    @classmethod
    def from_error(cls, err: WispError) -> ErrorReply:
        return cls(error=ErrorInfo.of(err))

    def to_error(self) -> WispError:
        return self.error.to_error()


# -- codec --------------------------------------------------------------------------------------
M = TypeVar("M")
_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def encode(msg: Any) -> bytes:
    """msgpack bytes of a message. Cross-field rules ran when ``msg`` was built; field
    constraints are the receiver's to check (:func:`checked` builds with them)."""
    data = _encoder.encode(msg)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"cannot encode {type(msg).__name__}: {len(data)} bytes exceed the "
                        f"payload limit of {MAX_PAYLOAD_BYTES}")
    return data


def checked(msg: M) -> M:
    """``msg`` after the checks a receiver would make (field constraints included), so that a
    sender can fail early: ``WispError(BAD_REQUEST)`` naming the field."""
    return decode(type(msg), encode(msg))


def decode(cls: type[M], data: bytes) -> M:
    """The message of type ``cls`` (a class or a union of tagged classes) in ``data``;
    ``WispError(BAD_REQUEST)`` for anything wrong."""
    _check_size(data)
    try:
        return _decoder(cls).decode(data)
    except msgspec.ValidationError as exc:
        raise WispError(ErrorCode.BAD_REQUEST, f"{_name(cls)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, RecursionError...
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload is not valid msgpack ({detail[:200]})") from None


class MalformedReply(WispError):
    """A reply that is neither the expected message nor an error reply."""


def decode_reply(cls: Any, data: bytes) -> Any:
    """A reply of type ``cls`` (or of one of the tagged classes of a tuple); an error reply is
    raised as the ``WispError`` it carries, a malformed one as `MalformedReply`."""
    union = cls if not isinstance(cls, tuple) else _union(cls)
    try:
        reply = decode(union | ErrorReply, data)
    except WispError as err:
        raise MalformedReply(err.code, err.message) from None
    if isinstance(reply, ErrorReply):
        raise reply.to_error()
    return reply


def error_reply(err: WispError) -> bytes:
    return encode(ErrorReply.from_error(err))


def _check_size(data: Any) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WispError(ErrorCode.BAD_REQUEST, f"payload must be bytes, got "
                        f"{type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size == 0:
        raise WispError(ErrorCode.BAD_REQUEST, "payload is empty")
    if size > MAX_PAYLOAD_BYTES:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")


def _decoder(cls: Any) -> msgspec.msgpack.Decoder:
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    return dec


def _union(classes: tuple[type, ...]) -> Any:
    union = classes[0]
    for c in classes[1:]:
        union = union | c
    return union


def _name(cls: Any) -> str:
    args = get_args(cls)
    return " | ".join(_name(a) for a in args) if args else getattr(cls, "__name__", str(cls))
