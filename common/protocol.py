"""Wire protocol: one dataclass per NATS message, one msgpack codec (DESIGN.md §4, §10).

Every payload is a msgpack map with ``"v": 1`` and snake_case fields; nested objects (SLO,
sampling, timings, batch entries) are maps too. :func:`encode` and :func:`decode` are the only
way in and out:

* decoding never unpickles or evaluates anything: ``msgpack.unpackb`` with ``raw=False`` and
  ``strict_map_key=True`` after a size check, ext types refused;
* every message is checked against its dataclass's type hints by a small schema walker (int,
  float, str, bool, ``X | None``, ``list[...]``, ``dict[str, ...]``, nested dataclasses,
  ``Literal``, enums) with per-field constraints carried by ``Annotated`` (:class:`Range`,
  :class:`Len`, :class:`Pattern`), then by the class's ``validate()`` hook for cross-field rules;
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

import difflib
import functools
import itertools
import math
import numbers
import re
import secrets
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import msgpack

from common.errors import ErrorCode, WispError
from common.subjects import NAME_RE, SAFE_TOKEN_RE, is_publish_subject

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

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry


# -- field constraints (used inside Annotated[...]) ------------------------------------------
@dataclass(frozen=True, slots=True)
class Range:
    """Numeric bounds of an int or float field."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def error(self, v: float) -> str | None:
        if self.ge is not None and not v >= self.ge:
            return f"must be >= {self.ge}, got {v!r}"
        if self.gt is not None and not v > self.gt:
            return f"must be > {self.gt}, got {v!r}"
        if self.le is not None and not v <= self.le:
            return f"must be <= {self.le}, got {v!r}"
        return None


@dataclass(frozen=True, slots=True)
class Len:
    """Length bounds of a list or str field, checked before its elements are walked."""

    min: int = 0
    max: int | None = None

    def error(self, v: Any) -> str | None:
        n = len(v)
        unit = "characters" if isinstance(v, str) else "entries"
        if n < self.min:
            return "must not be empty" if self.min == 1 else \
                f"must have at least {self.min} {unit}, got {n}"
        if self.max is not None and n > self.max:
            return f"has {n} {unit}; the limit is {self.max}"
        return None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A str field that must fully match ``regex``; ``what`` says it in words."""

    regex: re.Pattern[str]
    what: str

    def error(self, v: str) -> str | None:
        return None if self.regex.fullmatch(v) else f"must be {self.what}, got {_short(v)}"


class _PublishSubject:
    def error(self, v: str) -> str | None:
        return None if is_publish_subject(v) else \
            f"must be a subject to publish to (no spaces or wildcards), got {_short(v)}"


# -- field types ------------------------------------------------------------------------------
Id = Annotated[str, Pattern(SAFE_TOKEN_RE, "1-128 characters of A-Z a-z 0-9 _ -")]
Name = Annotated[str, Pattern(NAME_RE, "1-256 characters of A-Z a-z 0-9 _ - . / @ +")]
Sha256 = Annotated[str, Pattern(re.compile(r"[0-9a-f]{64}"), "64 lowercase hex digits")]
Inbox = Annotated[str, _PublishSubject()]
Count = Annotated[int, Range(ge=0)]  # counts, indices, lengths, rounds, token ids
TokenId = Count
Positive = Annotated[int, Range(ge=1)]
Seed = Annotated[int, Range(ge=0, le=_INT_MAX)]
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
        wire = _converter(cls)(msg, False)
    except _Invalid as exc:
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
        return {"v": PROTOCOL_VERSION, **_converter(cls)(msg, False)}
    except _Invalid as exc:
        raise exc.to_error(cls.__name__, "cannot encode ") from None


def from_dict(cls: type[M], obj: Any) -> M:
    """A message from an already unpacked wire map (with ``v``)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a protocol message class")
    if not isinstance(obj, dict):
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: payload must be a msgpack map, got {_type_name(obj)}")
    if "v" not in obj:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: missing field 'v' (protocol version)")
    version = obj["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"{cls.__name__}: unsupported protocol version {_short(version)}; "
                        f"this service speaks {PROTOCOL_VERSION}")
    body = {k: v for k, v in obj.items() if k != "v"}
    try:
        return _converter(cls)(body, True)
    except _Invalid as exc:
        raise exc.to_error(cls.__name__) from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not accepted")


def _unpack(data: Any) -> dict:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WispError(ErrorCode.BAD_REQUEST, f"payload must be bytes, got {_type_name(data)}")
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
                        f"payload must be a msgpack map, got {_type_name(obj)}")
    return obj


def _error_from_map(obj: dict) -> WispError:
    info = obj["error"]
    code = info.get("code") if isinstance(info, dict) else None
    if (type(obj["v"]) is int and obj["v"] == PROTOCOL_VERSION and isinstance(code, str)
            and code not in {c.value for c in ErrorCode}):
        # A code from a newer peer: keep its words rather than calling the reply malformed.
        message = info.get("message")
        return WispError(ErrorCode.INTERNAL,
                         f"peer error {_short(code)}: {message if isinstance(message, str) else ''}")
    return from_dict(ErrorReply, obj).to_error()


def _pick_class(classes: tuple[type, ...], obj: dict) -> type:
    keys = set(obj)
    matching = [c for c in classes if _required_fields(c) <= keys]
    if len(matching) == 1:
        return matching[0]
    if matching:  # the one whose every field is explained by the map's keys
        exact = [c for c in matching if keys - {"v"} <= _field_names(c)]
        if len(exact) == 1:
            return exact[0]
        raise WispError(ErrorCode.BAD_REQUEST,
                        f"payload matches more than one of {_names(classes)}")
    # None matches: report against the closest so the message names what is missing.
    return max(classes, key=lambda c: len(_field_names(c) & keys))


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(c.__name__ for c in classes)


# -- schema walker ----------------------------------------------------------------------------
class _Invalid(Exception):
    """A check failed at ``path`` (segments appended while the error unwinds)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def to_error(self, root: str, prefix: str = "") -> WispError:
        where = root
        for seg in self.path:
            where += seg if seg.startswith("[") else f".{seg}"
        return WispError(ErrorCode.BAD_REQUEST, f"{prefix}{where}: {self.message}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "map"
    if isinstance(v, list | tuple):
        return "list"
    return type(v).__name__


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _describe(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return "list"
    if origin is dict:
        return "map"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


Conv = Callable[[Any, bool], Any]  # (value, from_wire) -> value


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


@functools.cache
def _required_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls)
                     if f.init and f.default is MISSING and f.default_factory is MISSING)


@functools.cache
def _converter(tp: Any) -> Conv:
    """A checking converter for type hint ``tp``: wire value -> Python (from_wire=True) or
    Python -> msgpack-ready value (from_wire=False). Built once per hint."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _annotated_converter(tp)
    if origin in (Union, types.UnionType):
        return _union_converter(tp)
    if origin is Literal:
        return _literal_converter(get_args(tp))
    if origin is list:
        return _list_converter(get_args(tp)[0])
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        assert key_tp is str, "maps are keyed by str"
        return _dict_converter(value_tp)
    if tp is int:
        return _conv_int
    if tp is float:
        return _conv_float
    if tp is bool:
        return _conv_bool
    if tp is str:
        return _conv_str
    if tp is type(None):
        return _conv_none
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _enum_converter(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return _dataclass_converter(tp)
    raise TypeError(f"protocol: unsupported type hint {tp!r}")


def _conv_int(v: Any, from_wire: bool) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise _Invalid(f"expected int, got {_type_name(v)}")
    v = int(v)
    if not _INT_MIN <= v <= _INT_MAX:
        raise _Invalid(f"integer {_short(v)} does not fit in 64 bits")
    return v


def _conv_float(v: Any, from_wire: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise _Invalid(f"expected float, got {_type_name(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise _Invalid(f"number {_short(v)} is out of range") from None
    if not math.isfinite(v):
        raise _Invalid(f"must be a finite number, got {v!r}")
    return v


def _conv_bool(v: Any, from_wire: bool) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected bool, got {_type_name(v)}")
    return v


def _conv_str(v: Any, from_wire: bool) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"expected str, got {_type_name(v)}")
    return v


def _conv_none(v: Any, from_wire: bool) -> None:
    if v is not None:
        raise _Invalid(f"expected null, got {_type_name(v)}")
    return None


def _annotated_converter(tp: Any) -> Conv:
    base, *marks = get_args(tp)
    inner = _converter(base)
    pre = tuple(m for m in marks if isinstance(m, Len))
    post = tuple(m for m in marks if not isinstance(m, Len))

    def conv(v: Any, from_wire: bool) -> Any:
        if pre and isinstance(v, list | tuple | str):
            for m in pre:
                if (msg := m.error(v)) is not None:
                    raise _Invalid(msg)
        out = inner(v, from_wire)
        for m in post:
            if (msg := m.error(out)) is not None:
                raise _Invalid(msg)
        return out

    return conv


def _fast_list_check(item_tp: Any) -> Callable[[Any], bool] | None:
    """A test that accepts, using builtins only, a ``list[item_tp]`` that is certainly valid:
    item_tp a bounded int/float (token ids, probabilities) or a length-bounded list of one
    (sparse rows). Whatever it does not accept takes the element-by-element walk, which names
    the culprit; it never accepts anything that walk would refuse."""
    scalar = _fast_scalar_check(item_tp)
    if scalar is not None:
        return scalar
    if get_origin(item_tp) is not Annotated:
        return None
    row_tp, *marks = get_args(item_tp)
    if get_origin(row_tp) is not list or not all(isinstance(m, Len) for m in marks):
        return None
    inner = _fast_scalar_check(get_args(row_tp)[0])
    if inner is None:
        return None
    min_len = max([0] + [m.min for m in marks])
    max_len = min([_INT_MAX] + [m.max for m in marks if m.max is not None])

    def accepts(v: Any) -> bool:
        if type(v) is not list or not v or set(map(type, v)) != {list}:
            return False
        lengths = list(map(len, v))
        return (min_len <= min(lengths) and max(lengths) <= max_len
                and inner(list(itertools.chain.from_iterable(v))))

    return accepts


def _fast_scalar_check(item_tp: Any) -> Callable[[Any], bool] | None:
    if get_origin(item_tp) is not Annotated:
        return None
    base, *marks = get_args(item_tp)
    if base not in (int, float) or not all(isinstance(m, Range) and m.gt is None
                                           for m in marks):
        return None
    big = _INT_MAX if base is int else sys.float_info.max  # also keeps out inf (and NaN)
    lo = max([-big] + [m.ge for m in marks if m.ge is not None])
    hi = min([big] + [m.le for m in marks if m.le is not None])
    exact = {base}

    def accepts(v: Any) -> bool:
        # A NaN can hide from min/max but not from the sum.
        if type(v) is not list or not v or set(map(type, v)) != exact:
            return False
        if base is float and not math.isfinite(sum(v)):
            return False
        return lo <= min(v) and max(v) <= hi

    return accepts


def _union_converter(tp: Any) -> Conv:
    args = get_args(tp)
    nullable = type(None) in args
    arms = tuple(_converter(a) for a in args if a is not type(None))
    described = _describe(tp)

    def conv(v: Any, from_wire: bool) -> Any:
        if v is None:
            if nullable:
                return None
            raise _Invalid(f"expected {described}, got null")
        if len(arms) == 1:
            return arms[0](v, from_wire)
        for arm in arms:
            try:
                return arm(v, from_wire)
            except _Invalid:
                continue
        raise _Invalid(f"expected {described}, got {_type_name(v)}")

    return conv


def _literal_converter(allowed: tuple) -> Conv:
    listed = ", ".join(repr(a) for a in allowed)

    def conv(v: Any, from_wire: bool) -> Any:
        if type(v) is str and v in allowed:
            return v
        raise _Invalid(f"must be one of {listed}, got {_short(v)}")

    return conv


def _list_converter(item_tp: Any) -> Conv:
    item = _converter(item_tp)
    fast = _fast_list_check(item_tp)

    def conv(v: Any, from_wire: bool) -> list:
        if fast is not None and fast(v):
            return v
        if not isinstance(v, list | tuple):
            raise _Invalid(f"expected list, got {_type_name(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x, from_wire))
            except _Invalid as exc:
                exc.path.insert(0, f"[{i}]")
                raise
        return out

    return conv


def _dict_converter(value_tp: Any) -> Conv:
    value = _converter(value_tp)

    def conv(v: Any, from_wire: bool) -> dict:
        if not isinstance(v, dict):
            raise _Invalid(f"expected map, got {_type_name(v)}")
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Invalid(f"map keys must be str, got {_type_name(k)}")
            try:
                out[k] = value(x, from_wire)
            except _Invalid as exc:
                exc.path.insert(0, f"[{k!r}]")
                raise
        return out

    return conv


def _enum_converter(enum: type[Enum]) -> Conv:
    values = {e.value: e for e in enum}
    listed = ", ".join(repr(v) for v in values)

    def conv(v: Any, from_wire: bool) -> Any:
        member = v if isinstance(v, enum) else values.get(v) if isinstance(v, str) else None
        if member is None:
            raise _Invalid(f"must be one of {listed}, got {_short(v)}")
        return member if from_wire else member.value

    return conv


def _dataclass_converter(cls: type) -> Conv:
    hints = get_type_hints(cls, include_extras=True)
    specs = tuple((f.name, _converter(hints[f.name])) for f in fields(cls) if f.init)
    names = _field_names(cls)
    required = _required_fields(cls)
    validate = getattr(cls, "validate", None)

    def conv(v: Any, from_wire: bool) -> Any:
        if from_wire:
            if not isinstance(v, dict):
                raise _Invalid(f"expected map, got {_type_name(v)}")
            if unknown := v.keys() - names:
                raise _Invalid(_unknown_fields(unknown, names))
            if missing := required - v.keys():
                raise _Invalid("missing required field"
                               f"{'s' if len(missing) > 1 else ''} "
                               + ", ".join(repr(m) for m in sorted(missing)))
            kwargs = {}
            for name, conv_field in specs:
                if name in v:
                    try:
                        kwargs[name] = conv_field(v[name], True)
                    except _Invalid as exc:
                        exc.path.insert(0, name)
                        raise
            msg = cls(**kwargs)
            out = msg
        else:
            if not isinstance(v, cls):
                raise _Invalid(f"expected {cls.__name__}, got {_type_name(v)}")
            msg, out = v, {}
            for name, conv_field in specs:
                try:
                    out[name] = conv_field(getattr(v, name), False)
                except _Invalid as exc:
                    exc.path.insert(0, name)
                    raise
        if validate is not None:
            try:
                msg.validate()
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        return out

    return conv


def _unknown_fields(unknown: set, names: frozenset[str]) -> str:
    parts = []
    for key in sorted(unknown, key=str):
        text = repr(key)
        if isinstance(key, str) and (close := difflib.get_close_matches(key, names, n=1)):
            text += f" (did you mean {close[0]!r}?)"
        parts.append(text)
    return f"unknown field{'s' if len(parts) > 1 else ''} " + ", ".join(parts)
