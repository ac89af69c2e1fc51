"""Wire protocol: one dataclass per NATS message, one msgpack codec (DESIGN.md §4, §10).

Every payload is a msgpack map with ``"v": 1`` and snake_case fields; nested objects (SLO,
sampling, timings, batch entries) are maps too. :func:`encode` and :func:`decode` are the only
way in and out:

* decoding never unpickles or evaluates anything: ``msgpack.unpackb`` with ``raw=False`` and
  ``strict_map_key=True`` after a size check, ext types refused;
* every message is checked against its dataclass's type hints by the schema walker of
  :mod:`common.wire_schema` (int, float, str, bool, ``X | None``, ``list[...]``,
  ``dict[str, ...]``, nested dataclasses, ``Literal``, enums) with per-field constraints carried
  by ``Annotated`` (:class:`Range`, :class:`Len`, :class:`Pattern`), then by the class's
  ``validate()`` hook for cross-field rules;
* every problem becomes ``WispError(ErrorCode.BAD_REQUEST, ...)`` whose message names the field
  (``VerifyRequest.draft_ids[3]: must be >= 0, got -1``). Unknown fields are refused, so a typo
  is loud; ``bool`` is not an ``int``; an ``int`` is accepted where a ``float`` is expected;
  floats must be finite.

Checks that need the model (ids within the vocabulary, prompt + output within the context,
``k_max`` of the deployment) stay in the cores; the limits here only bound what a peer may make
a service allocate. :func:`encode` runs the same checks, so a bad message fails at its sender.

This module imports neither torch nor the cores at import time (the SDK uses it); the
conversion helpers import them lazily.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args

import msgpack

from common.errors import ErrorCode, WispError
from common.subjects import NAME_RE, SAFE_TOKEN_RE
from common.wire_schema import (
    INT_MAX,
    Invalid,
    Len,
    Pattern,
    PublishSubject,
    Range,
    converter_for,
    field_names,
    required_fields,
    short_repr,
    type_name,
)

if TYPE_CHECKING:
    from common.sampling import SamplingParams
    from services.gpu_verifier.core import SessionSpec, VerifyItem, VerifyOutcome

__all__ = [
    "MAX_BATCH_ENTRIES",
    "MAX_DRAFT_TOKENS",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_PAYLOAD_BYTES",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_IDS",
    "MAX_SPARSE_M",
    "MODES",
    "PROTOCOL_VERSION",
    "BatchDone",
    "BatchEntry",
    "ErrorInfo",
    "ErrorReply",
    "Event",
    "GenerateDone",
    "GenerateRequest",
    "GenerateStats",
    "GenerateTimings",
    "Heartbeat",
    "Len",
    "Pattern",
    "PredictorUpdated",
    "Range",
    "Sampling",
    "SessionClose",
    "SessionClosed",
    "SessionOpen",
    "SessionOpened",
    "Slo",
    "TokenChunk",
    "VerifierBatch",
    "VerifyRequest",
    "VerifyResult",
    "decode",
    "decode_reply",
    "encode",
    "error_reply",
    "from_dict",
    "new_sid",
    "to_dict",
]

PROTOCOL_VERSION = 1

# Wire-level bounds: what a peer can make a service allocate, checked before anything else.
# NATS must allow payloads this large (nats-server's default max_payload is 1 MiB).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_PROMPT_IDS = 32_768
MAX_PROMPT_CHARS = 1_048_576  # a text prompt, bounding the edge's tokenizer work
MAX_DRAFT_TOKENS = 64  # per round; each deployment's (smaller) k_max is enforced by the cores
MAX_SPARSE_M = 64  # entries of one position's sparse draft distribution
MAX_BATCH_ENTRIES = 1024  # requests in one VerifierBatch
MAX_ERROR_MESSAGE_CHARS = 2000  # error replies are cut to this


# -- field types (constraints: common.wire_schema) --------------------------------------------
Id = Annotated[str, Pattern(SAFE_TOKEN_RE, "1-128 characters of A-Z a-z 0-9 _ -")]
Name = Annotated[str, Pattern(NAME_RE, "1-256 characters of A-Z a-z 0-9 _ - . / @ +")]
Sha256 = Annotated[str, Pattern(re.compile(r"[0-9a-f]{64}"), "64 lowercase hex digits")]
Inbox = Annotated[str, PublishSubject()]
Count = Annotated[int, Range(ge=0)]  # counts, indices, lengths, rounds, token ids
TokenId = Count
Positive = Annotated[int, Range(ge=1)]
Seed = Annotated[int, Range(ge=0, le=INT_MAX)]
KMax = Annotated[int, Range(ge=1, le=MAX_DRAFT_TOKENS)]
Ms = Annotated[float, Range(ge=0.0)]  # a duration in milliseconds
PositiveMs = Annotated[float, Range(gt=0.0)]
Prob = Annotated[float, Range(ge=0.0, le=1.0)]
Temperature = Annotated[float, Range(ge=0.0)]
TopP = Annotated[float, Range(gt=0.0, le=1.0)]
PromptIds = Annotated[list[TokenId], Len(1, MAX_PROMPT_IDS)]
DraftIds = Annotated[list[TokenId], Len(0, MAX_DRAFT_TOKENS)]
SparseIds = Annotated[list[Annotated[list[TokenId], Len(1, MAX_SPARSE_M)]],
                      Len(0, MAX_DRAFT_TOKENS)]  # [k][m]
SparseProbs = Annotated[list[Annotated[list[Prob], Len(1, MAX_SPARSE_M)]],
                        Len(0, MAX_DRAFT_TOKENS)]  # [k][m]
Scalar = int | float | str | bool | None
Mode = Literal["wisp", "sled", "ucb", "centralized", "colocated"]
FinishReason = Literal["eos", "length", "error"]
MODES: tuple[str, ...] = get_args(Mode)


def new_sid() -> str:
    """A random 128-bit session id (DESIGN.md §10), safe in subjects and keys."""
    return secrets.token_hex(16)


# -- nested objects ---------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class Slo:
    ttft_ms: PositiveMs
    tpot_ms: PositiveMs


@dataclass(slots=True, kw_only=True)
class Sampling:
    """Wire form of :class:`common.sampling.SamplingParams` (same fields, same defaults)."""

    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: Count = 0
    draft_top_m: Annotated[int, Range(ge=1, le=MAX_SPARSE_M)] = 8

    def to_params(self) -> SamplingParams:
        from common.sampling import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              draft_top_m=self.draft_top_m)

    @classmethod
    def from_params(cls, params: SamplingParams) -> Sampling:
        return cls(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                   draft_top_m=params.draft_top_m)


@dataclass(slots=True, kw_only=True)
class GenerateTimings:
    ttft_ms: Ms
    tpot_ms: Ms
    e2e_ms: Ms


@dataclass(slots=True, kw_only=True)
class GenerateStats:
    rounds: Count
    drafted: Count
    accepted: Count

    def validate(self) -> None:
        if self.accepted > self.drafted:
            raise ValueError(f"accepted ({self.accepted}) exceeds drafted ({self.drafted})")


@dataclass(slots=True, kw_only=True)
class ErrorInfo:
    code: ErrorCode
    message: str


# -- SDK <-> edge-drafter / admission-scheduler ----------------------------------------------
@dataclass(slots=True, kw_only=True)
class GenerateRequest:
    """Start a generation: give exactly one of ``prompt`` (text) or ``prompt_ids``."""

    max_new_tokens: Positive
    mode: Mode = "wisp"
    prompt: Annotated[str, Len(1, MAX_PROMPT_CHARS)] | None = None
    prompt_ids: PromptIds | None = None
    slo: Slo | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: Count = 0
    seed: Seed | None = None
    k_max: KMax | None = None  # None: the edge's default
    policy: Name | None = None  # draft-length policy; None: the mode's default
    device_profile: Name | None = None
    # Continue a session whose edge-drafter went away: its committed tokens and parameters
    # come from Redis; the stream restarts at output index 0 (the client skips what it has).
    resume_sid: Id | None = None

    def validate(self) -> None:
        if self.resume_sid is not None and self.prompt is None and self.prompt_ids is None:
            return
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) and prompt_ids, "
                             + ("not both" if self.prompt is not None else "got neither"))


@dataclass(slots=True, kw_only=True)
class TokenChunk:
    """Streamed to the request's reply inbox; ``index`` is that of token_ids[0] in the output."""

    sid: Id
    index: Count
    token_ids: list[TokenId]
    text: str


@dataclass(slots=True, kw_only=True)
class GenerateDone:
    """Last message of a stream. ``error`` only with finish_reason "error"."""

    sid: Id
    finish_reason: FinishReason
    num_tokens: Count
    timings: GenerateTimings
    stats: GenerateStats
    error: ErrorInfo | None = None

    def validate(self) -> None:
        if self.error is not None and self.finish_reason != "error":
            raise ValueError(f"error is set but finish_reason is {self.finish_reason!r}")


# -- edge-drafter <-> admission-scheduler ----------------------------------------------------
@dataclass(slots=True, kw_only=True)
class SessionOpen:
    sid: Id
    mode: Mode
    prompt_ids: PromptIds
    max_new_tokens: Positive
    device_id: Name
    k_max: KMax
    sampling: Sampling = field(default_factory=Sampling)
    seed: Seed | None = None
    slo: Slo | None = None

    def to_spec(self, committed_output: list[int] | None = None) -> SessionSpec:
        from services.gpu_verifier.core import SessionSpec

        return SessionSpec(sid=self.sid, prompt_ids=list(self.prompt_ids),
                           max_new_tokens=self.max_new_tokens,
                           params=self.sampling.to_params(), seed=self.seed,
                           committed_output=list(committed_output or []))


@dataclass(slots=True, kw_only=True)
class SessionOpened:
    sid: Id
    verifier_id: Id
    committed_len: Count


@dataclass(slots=True, kw_only=True)
class SessionClose:
    sid: Id


@dataclass(slots=True, kw_only=True)
class SessionClosed:
    sid: Id


@dataclass(slots=True, kw_only=True)
class VerifyRequest:
    """One round of one session. ``budget_ms``: how long the edge can still wait for the
    result (DESIGN.md §6); it may be negative when the round is already late."""

    sid: Id
    round: Count
    base_len: Count
    draft_ids: DraftIds  # [k]
    budget_ms: float
    draft_ms: Ms
    device_id: Name
    draft_sparse_ids: SparseIds | None = None  # [k][m], sampling only
    draft_sparse_probs: SparseProbs | None = None  # [k][m], sampling only

    def validate(self) -> None:
        ids, probs = self.draft_sparse_ids, self.draft_sparse_probs
        if (ids is None) != (probs is None):
            raise ValueError("draft_sparse_ids and draft_sparse_probs must both be given or "
                             "both be absent")
        if ids is None or probs is None:
            return
        k = len(self.draft_ids)
        for name, rows in (("draft_sparse_ids", ids), ("draft_sparse_probs", probs)):
            if len(rows) != k:
                raise ValueError(f"{name} has {len(rows)} rows; it needs one row per drafted "
                                 f"token ({k})")
        for i, (row_ids, row_probs) in enumerate(zip(ids, probs, strict=True)):
            if len(row_ids) != len(row_probs):
                raise ValueError(f"row {i}: draft_sparse_ids has {len(row_ids)} entries but "
                                 f"draft_sparse_probs has {len(row_probs)}")

    def to_item(self) -> VerifyItem:
        from services.gpu_verifier.core import VerifyItem

        return VerifyItem(sid=self.sid, round=self.round, base_len=self.base_len,
                          draft_ids=list(self.draft_ids),
                          draft_sparse_ids=self.draft_sparse_ids,
                          draft_sparse_probs=self.draft_sparse_probs)

    @classmethod
    def from_draft(cls, draft: Any, *, round: int, budget_ms: float,
                   device_id: str) -> VerifyRequest:
        """From an edge ``services.edge_drafter.core.Draft``."""
        return cls(sid=draft.sid, round=round, base_len=draft.base_len,
                   draft_ids=list(draft.token_ids), budget_ms=budget_ms,
                   draft_ms=draft.draft_time_s * 1000.0, device_id=device_id,
                   draft_sparse_ids=draft.sparse_ids, draft_sparse_probs=draft.sparse_probs)


@dataclass(slots=True, kw_only=True)
class VerifyResult:
    sid: Id
    round: Count
    num_drafted: Count
    num_accepted: Count
    new_tokens: Annotated[list[TokenId], Len(0, MAX_DRAFT_TOKENS + 1)]
    committed_len: Count
    finished: bool
    queue_ms: Ms
    batch_ms: Ms
    batch_size: Positive

    def validate(self) -> None:
        if self.num_accepted > self.num_drafted:
            raise ValueError(f"num_accepted ({self.num_accepted}) exceeds num_drafted "
                             f"({self.num_drafted})")

    @classmethod
    def from_outcome(cls, outcome: VerifyOutcome, queue_ms: float, batch_ms: float,
                     batch_size: int) -> VerifyResult:
        return cls(sid=outcome.sid, round=outcome.round, num_drafted=outcome.num_drafted,
                   num_accepted=outcome.num_accepted, new_tokens=list(outcome.new_tokens),
                   committed_len=outcome.committed_len, finished=outcome.finished,
                   queue_ms=queue_ms, batch_ms=batch_ms, batch_size=batch_size)


# -- admission-scheduler <-> gpu-verifier ----------------------------------------------------
@dataclass(slots=True, kw_only=True)
class BatchEntry:
    request: VerifyRequest
    reply_to: Inbox  # the edge's reply inbox: the verifier answers there directly
    deadline_ms: float  # absolute, on the scheduler's clock


@dataclass(slots=True, kw_only=True)
class VerifierBatch:
    batch_id: Id
    items: Annotated[list[BatchEntry], Len(1, MAX_BATCH_ENTRIES)]


@dataclass(slots=True, kw_only=True)
class BatchDone:
    """Estimator feedback (DESIGN.md §6); also tells the scheduler the verifier is free."""

    verifier_id: Id
    batch_id: Id
    batch_ms: Ms
    size: Count
    num_linear: Count  # new tokens fed
    num_interactions: Count  # Σ new × (cached + new)
    num_cached: Count  # Σ cached tokens read


@dataclass(slots=True, kw_only=True)
class Heartbeat:
    verifier_id: Id
    model: Name
    hardware: Name
    free_blocks: Count
    total_blocks: Count
    num_sessions: Count
    ts_ms: float

    def validate(self) -> None:
        if self.free_blocks > self.total_blocks:
            raise ValueError(f"free_blocks ({self.free_blocks}) exceeds total_blocks "
                             f"({self.total_blocks})")


# -- events, predictor, errors ---------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class Event:
    kind: Id
    ts_ms: float
    sid: Id | None = None
    fields: dict[str, Scalar] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class PredictorUpdated:
    version: Count
    object_name: Annotated[str, Len(1, 256)]
    sha256: Sha256


@dataclass(slots=True, kw_only=True)
class ErrorReply:
    error: ErrorInfo

    @classmethod
    def from_error(cls, err: WispError) -> ErrorReply:
        message = err.message
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[:MAX_ERROR_MESSAGE_CHARS - 3] + "..."
        return cls(error=ErrorInfo(code=err.code, message=message))

    def to_error(self) -> WispError:
        return WispError(self.error.code, self.error.message)


# -- codec ------------------------------------------------------------------------------------
M = TypeVar("M")


def encode(msg: Any) -> bytes:
    """msgpack bytes of a message, checked like :func:`decode` checks them."""
    cls = type(msg)
    try:
        wire = converter_for(cls)(msg, False)
    except Invalid as exc:
        raise exc.to_error(cls.__name__, "cannot encode ") from None
    data = msgpack.packb({"v": PROTOCOL_VERSION, **wire}, use_bin_type=True)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"cannot encode {cls.__name__}: {len(data)} bytes exceed the payload "
                        f"limit of {MAX_PAYLOAD_BYTES}")
    return data


def decode(cls: type[M], data: bytes) -> M:
    """The message of type ``cls`` in ``data``; ``WispError(BAD_REQUEST)`` for anything wrong."""
    return from_dict(cls, _unpack(data))


def decode_reply(cls: type[M] | tuple[type, ...], data: bytes) -> M:
    """A reply of type ``cls`` (or of one of the types in a tuple, told apart by their
    required fields: ``decode_reply((TokenChunk, GenerateDone), data)``); an error reply is
    raised as the ``WispError`` it carries."""
    obj = _unpack(data)
    if obj.keys() == {"v", "error"}:
        raise _error_from_map(obj)
    if isinstance(cls, tuple):
        cls = _pick_class(cls, obj)
    return from_dict(cls, obj)  # type: ignore[arg-type]


def error_reply(err: WispError) -> bytes:
    return encode(ErrorReply.from_error(err))


def to_dict(msg: Any) -> dict[str, Any]:
    """The wire map of a message (with ``v``), checked, without packing it."""
    cls = type(msg)
    try:
        return {"v": PROTOCOL_VERSION, **converter_for(cls)(msg, False)}
    except Invalid as exc:
        raise exc.to_error(cls.__name__, "cannot encode ") from None


def from_dict(cls: type[M], obj: Any) -> M:
    """A message from an already unpacked wire map (with ``v``)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a protocol message class")
    if not isinstance(obj, dict):
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: payload must be a msgpack map, got {type_name(obj)}")
    if "v" not in obj:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: missing field 'v' (protocol version)")
    version = obj["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: unsupported protocol version {short_repr(version)}; "
                        f"this service speaks {PROTOCOL_VERSION}")
    body = {k: v for k, v in obj.items() if k != "v"}
    try:
        return converter_for(cls)(body, True)
    except Invalid as exc:
        raise exc.to_error(cls.__name__) from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not accepted")


def _unpack(data: Any) -> dict:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WispError(ErrorCode.BAD_REQUEST, f"payload must be bytes, got {type_name(data)}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size == 0:
        raise WispError(ErrorCode.BAD_REQUEST, "payload is empty")
    if size > MAX_PAYLOAD_BYTES:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        # Container and string lengths are capped at len(data) by unpackb itself.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              ext_hook=_refuse_ext)
    except msgpack.ExtraData:
        raise WispError(ErrorCode.BAD_REQUEST,
                        "payload is not one msgpack object: extra bytes after it") from None
    except Exception as exc:  # FormatError, StackError, ValueError, UnicodeDecodeError, ...
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise WispError(ErrorCode.BAD_REQUEST, f"payload is not valid msgpack ({detail})") from exc
    if not isinstance(obj, dict):
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload must be a msgpack map, got {type_name(obj)}")
    return obj


def _error_from_map(obj: dict) -> WispError:
    info = obj["error"]
    code = info.get("code") if isinstance(info, dict) else None
    if (type(obj["v"]) is int and obj["v"] == PROTOCOL_VERSION and isinstance(code, str)
            and code not in {c.value for c in ErrorCode}):
        # A code from a newer peer: keep its words rather than calling the reply malformed.
        message = info.get("message")
        return WispError(ErrorCode.INTERNAL,
                         f"peer error {short_repr(code)}: {message if isinstance(message, str) else ''}")
    return from_dict(ErrorReply, obj).to_error()


def _pick_class(classes: tuple[type, ...], obj: dict) -> type:
    keys = set(obj)
    matching = [c for c in classes if required_fields(c) <= keys]
    if len(matching) == 1:
        return matching[0]
    if matching:  # the one whose every field is explained by the map's keys
        exact = [c for c in matching if keys - {"v"} <= field_names(c)]
        if len(exact) == 1:
            return exact[0]
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload matches more than one of {_names(classes)}")
    # None matches: report against the closest so the message names what is missing.
    return max(classes, key=lambda c: len(field_names(c) & keys))


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(c.__name__ for c in classes)
